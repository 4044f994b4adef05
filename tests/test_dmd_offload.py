"""`module.dmd.teacher_offload`: the frozen teacher visits the device only for its forwards (one
device / DDP: a StageResidency over pinned host memory) or keeps its FSDP2 shards in host memory
(CPUOffloadPolicy), with results identical to offload off. (The 2-process FSDP2 run with the
offload on is in test_dmd_distributed.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, tiny_run
from hydra.utils import instantiate

from magitrain.checkpoint import save_official
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("teacher") / "base")


def test_offloaded_teacher_visits_the_device_per_forward_and_changes_nothing(
    latent_shards, teacher_ckpt, tmp_path
):
    def run(offload: bool, *extra: str):
        overrides = tiny_run(
            latent_shards,
            "recipe=dmd2_distill",
            "codecs=tiny",
            f"teacher={teacher_ckpt}",
            "module.dmd.ttur=2",
            "module.optim.lr=1e-3",
            "module.critic_optim.lr=1e-3",
            "trainer.max_steps=2",
            f"module.dmd.teacher_offload={str(offload).lower()}",
            *extra,
        )
        return train(compose_train(overrides, tmp_path / str(offload))).lightning_module

    # the offloaded run also samples the teacher for validation (which leaves training untouched)
    validation = ("callbacks=dmd_validation", "callbacks.progress_bar=null",
                  "callbacks.validation.every_n_steps=2", "callbacks.validation.prompts=[A man says hello]",
                  "callbacks.validation.seconds=0.32", "callbacks.validation.resolution=64x32")  # fmt: skip
    on, off = run(True, *validation), run(False)
    # the teacher was loaded for each generator step's guided forward and released after it, and
    # once more for its validation clip after step 2
    assert on._teacher_residency.log == [("load", "teacher"), ("release", "teacher")] * 3
    assert (tmp_path / "True" / "validation_teacher" / "step00000002" / "sample0.mp4").stat().st_size > 1000
    assert off._teacher_residency is None
    want, got = off.state_dict(), on.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_under_fsdp2_only_the_teacher_gets_the_cpu_offload_policy(teacher_ckpt, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        overrides = ["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}"]
        placements = {}
        for offload in (True, False):
            cfg = compose_train([*overrides, f"module.dmd.teacher_offload={offload}"], tmp_path)
            module = instantiate(cfg.module)
            module._device_mesh = mesh
            module.configure_model()
            networks = {"student": module.model, "critic": module.critic, "teacher": module.teacher}
            placements[offload] = {
                role: type(network.block.layers[0]._get_fsdp_state()._fsdp_param_group.offload_policy)
                for role, network in networks.items()
            }
            # the teacher still equals the student it was copied from (shards copied locally)
            student = module.model.state_dict().values()
            for a, b in zip(module.teacher.state_dict().values(), student, strict=True):
                torch.testing.assert_close(_full(a).float(), _full(b).to(a.dtype).float())
    finally:
        dist.destroy_process_group()
    assert placements[True]["teacher"] is CPUOffloadPolicy
    assert placements[False]["teacher"] is not CPUOffloadPolicy
    for offload in (True, False):
        assert placements[offload]["student"] is not CPUOffloadPolicy
        assert placements[offload]["critic"] is not CPUOffloadPolicy


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@pytest.mark.gpu
def test_on_a_gpu_the_offloaded_teacher_waits_in_pinned_host_memory(
    latent_shards, teacher_ckpt, tmp_path, monkeypatch
):
    """(A GPU check: scripts/gpu_checks.sh runs it.) The teacher is in pinned host memory between
    its forwards and on the device inside them, and training equals the run without offload."""
    from magitrain.recipes import DMD2Module

    during = []
    start = DMD2Module.on_fit_start

    def on_fit_start(self):
        start(self)
        hook = lambda network, args: during.append(next(network.parameters()).device.type)  # noqa: E731
        self.teacher.register_forward_pre_hook(hook)

    monkeypatch.setattr(DMD2Module, "on_fit_start", on_fit_start)

    def run(offload: bool):
        overrides = tiny_run(
            latent_shards,
            "recipe=dmd2_distill",
            f"teacher={teacher_ckpt}",
            "module.dmd.ttur=2",
            "module.optim.lr=1e-3",
            "module.critic_optim.lr=1e-3",
            "trainer.max_steps=2",
            "trainer.devices=1",
            f"module.dmd.teacher_offload={str(offload).lower()}",
        )
        overrides = ["trainer=gpu" if o == "trainer=cpu" else o for o in overrides]
        return train(compose_train(overrides, tmp_path / str(offload))).lightning_module

    on = run(True)
    assert during == ["cuda"] * 4  # conditional and unconditional forward of 2 generator steps
    assert all(p.device.type == "cpu" and p.is_pinned() for p in on.teacher.parameters())
    off = run(False)
    assert all(p.device.type == "cuda" for p in off.teacher.parameters())
    want, got = off.state_dict(), on.state_dict()
    for k in want:  # (attention backward kernels may be nondeterministic on a GPU)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
