"""The memory planner: its fake-tensor step against a real step measured by the same tracker."""

from __future__ import annotations

import json

import pytest

from magitrain.model import MagiHumanDiT, get_config
from magitrain.plan import measure_step, plan
from magitrain.plan.__main__ import main
from magitrain.recipes import FlowMatchingModule


def _measure(name: str, fake: bool, checkpointing: bool, latent=(3, 4, 6), batch=2):
    from magitrain.parallel import ParallelConfig

    module = FlowMatchingModule(
        get_config(name), parallel=ParallelConfig(activation_checkpointing=checkpointing)
    )
    return measure_step(module, batch, latent, 16, "bf16-mixed", fake=fake), module


@pytest.mark.parametrize("name,checkpointing", [("tiny", False), ("tiny", True), ("golden_tiny", False)])
def test_fake_step_matches_real_step(name, checkpointing):
    planned, _ = _measure(name, fake=True, checkpointing=checkpointing)
    real, module = _measure(name, fake=False, checkpointing=checkpointing)
    # states: exact, and equal to what the real run's tensors hold
    for role in ("params", "grads", "optimizer", "ema", "frozen", "buffers"):
        assert getattr(planned, role) == getattr(real, role), role
    params = list(module.model.parameters())
    trained = sum(p.numel() * 4 for p in params)
    assert real.params == real.grads == {"model": trained} and real.ema == trained
    assert real.frozen == {}
    # two float32 moments per parameter and one float32 step counter per tensor
    assert real.optimizer == {"model": 2 * trained + 4 * len(params)}
    assert real.activations["step"] > 0
    assert abs(planned.activations["step"] - real.activations["step"]) <= 0.10 * real.activations["step"]
    assert abs(planned.peak - real.peak) <= 0.10 * real.peak


def test_fsdp2_fake_step_matches_real_step():
    """FSDP2 over a fake 4-rank process group: rank 0's states (local shards) and its activations
    with the gathered blocks, fake against real tensors."""
    from magitrain.parallel import ParallelConfig
    from magitrain.plan.step import fake_process_group

    out = []
    for fake in (True, False):
        module = FlowMatchingModule(get_config("golden_tiny"), parallel=ParallelConfig())
        with fake_process_group(4) as mesh:
            out.append(
                measure_step(
                    module, 1, (5, 8, 8), 16, "bf16-mixed", fake=fake, autocast_cache=False, mesh=mesh
                )
            )
    planned, real = out
    for role in ("params", "grads", "optimizer", "ema", "frozen", "buffers"):
        assert getattr(planned, role) == getattr(real, role), role
    whole = sum(p.numel() * 4 for p in MagiHumanDiT(get_config("golden_tiny")).parameters())
    assert real.params["model"] < whole // 3  # a quarter, plus FSDP2's padding of uneven dims
    assert abs(planned.activations["step"] - real.activations["step"]) <= 0.10 * real.activations["step"]
    assert abs(planned.peak - real.peak) <= 0.10 * real.peak


def test_fsdp2_shards_equal_fsdp_mem_tracker():
    """The planner's per-rank parameter bytes under FSDP2 are what torch's FSDPMemTracker counts as
    sharded parameters for the same network on the same fake 4-rank group."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from magitrain.parallel import ParallelConfig
    from magitrain.plan.step import _full_text, fake_mode, fake_process_group, synthetic_batch

    config = get_config("golden_tiny")
    module = FlowMatchingModule(config, parallel=ParallelConfig())
    with fake_process_group(4) as mesh:
        planned = measure_step(
            module, 1, (5, 8, 8), 16, "bf16-mixed", fake=True, autocast_cache=False, mesh=mesh
        )
        with fake_mode():
            network = FlowMatchingModule(config, parallel=ParallelConfig())
            network._device_mesh = mesh
            network.configure_model()
            batch = synthetic_batch(config, 1, (5, 8, 8), 16)
            network.model.register_forward_pre_hook(_full_text, with_kwargs=True)
            tracker = FSDPMemTracker(network.model)
            with tracker, torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                network.flow_loss(batch)["loss"].backward()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    sharded = {getattr(k, "value", k): v for k, v in peak.items()}
    assert planned.params["model"] == sharded["Sharded Param"]


def test_checkpointing_lowers_planned_activations():
    off, _ = _measure("golden_tiny", fake=True, checkpointing=False, latent=(5, 8, 8))
    on, _ = _measure("golden_tiny", fake=True, checkpointing=True, latent=(5, 8, 8))
    assert on.activations["step"] < off.activations["step"]


def test_plan_shards_states_over_fsdp2_ranks(tmp_path):
    bucket = {"height": 64, "width": 96, "frames": 9, "batch_size": 1}
    one = plan(["model=tiny", "strategy=fsdp2"], 1, 2**30, bucket)
    four = plan(["model=tiny", "strategy=fsdp2"], 4, 2**30, bucket)
    # measured on rank 0 of a fake 4-rank group: FSDP2's local shards
    for role in ("model params", "model grads", "ema"):
        assert four.per_gpu[role] == one.per_gpu[role] // 4
    # AdamW: two moments of the local shard, and a whole float32 step counter per tensor on every rank
    tensors = len(list(MagiHumanDiT(get_config("tiny")).parameters()))
    assert four.per_gpu["model optimizer"] == 2 * four.per_gpu["model params"] + 4 * tensors
    ddp = plan(["model=tiny", "strategy=ddp"], 4, 2**30, bucket)
    assert ddp.per_gpu["model params"] == one.per_gpu["model params"]
    assert one.fits and one.largest_batch >= 1
    offload = plan(["model=tiny", "strategy=fsdp2", "module.parallel.cpu_offload=true"], 4, 2**30, bucket)
    assert (
        offload.per_gpu["model optimizer"] == offload.per_gpu["model params"] == offload.per_gpu["ema"] == 0
    )
    assert offload.host == sum(
        four.per_gpu[r] for r in ("model params", "model grads", "model optimizer", "ema")
    )
    assert offload.activations_by_phase == four.activations_by_phase
    tight = plan(["model=tiny", "strategy=ddp"], 1, one.total // 2, bucket)
    assert not tight.fits and tight.suggestions


def test_cli_json(capsys):
    """Also: "does not fit" exits 1 (it exited 0), so scripts can test it."""
    args = ["model=tiny", "gpus=2", "height=64", "width=96", "seconds=0.4", "--json"]
    assert main([*args, "gpu_memory=0.001GB"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 2 and out["bucket"]["frames"] == 9 and not out["fits"]
    assert out["total"] == sum(out["per_gpu"].values())


def test_cli_rejects_bad_sizes(script):
    for bad, key in (("gpu_memory=lots", "gpu_memory"), ("gpus=0", "gpus")):
        proc = script("-m", "magitrain.plan", "model=tiny", bad)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_and_a_one_line_title_with_the_memory_as_given(script):
    """`--help` reached Hydra as an override (LexerNoViableAltException); the table's title
    wrapped; gpu_memory=80GB printed as "80 GiB", not as the user gave it."""
    from rich.console import Console

    from magitrain.plan.__main__ import render, title

    helped = script("-m", "magitrain.plan", "--help")
    assert helped.returncode == 0 and "gpu_memory" in helped.stdout, helped.stderr[-2000:]
    p = plan(["model=tiny"], 8, 80 * 2**30, {"height": 64, "width": 96, "frames": 9, "batch_size": 1})
    console = Console(width=60, record=True)
    render(p, "80GB", console)
    heading = title(p, "80GB")
    assert "on 8 x 80GB (80.00 GiB)" in heading and len(heading) > 60
    assert heading in console.export_text().splitlines()  # one line, however narrow the terminal
