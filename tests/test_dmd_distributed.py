"""The DMD-2 recipe with two CPU processes (gloo): DDP and FSDP2 match one process on the same
global batch (4 samples: one batch of 4, or two ranks with 2 each). Every draw of the recipe is
per sample key or seeded by (seed, generator step), so losses and all three networks must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_train
from test_train_base import read_metrics

from magitrain.checkpoint import load_official, save_official
from magitrain.checkpoint.export import read_dcp_networks, read_training_checkpoint
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four_samples(tmp_path_factory):
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("four")
    make_latent_dataset(out, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    torch.manual_seed(5)
    save_official(MagiHumanDiT(tiny()), out / "teacher")
    return out


def run_dmd(
    out_dir,
    shards,
    devices: int,
    strategy: str,
    batch_size: int,
    extra: tuple[str, ...] = (),
    recipe: str = "dmd2_distill",
):
    overrides = [
        f"recipe={recipe}",
        "model=tiny",
        "trainer=cpu",
        f"trainer.devices={devices}",
        f"strategy={strategy}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "module.dmd.ttur=2",
        "module.dmd.p_image=0.5",
        "module.dmd.teacher_dtype=float32",  # bf16 matmuls round differently at batch 2 and 4
        "module.optim.lr=1e-3",
        "module.critic_optim.lr=1e-3",
        "callbacks.ema.start_step=1",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"data.shards={shards}/*.tar",
        "data.num_workers=0",
        "data.shuffle=false",
        f"data.buckets=[{{height: 64, width: 96, frames: 9, batch_size: {batch_size}}}]",
        f"teacher={shards}/teacher",
        *extra,
    ]
    if devices == 1:  # the reference run, in this process (a process of its own costs its imports)
        train(compose_train(overrides, out_dir))
        return
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={out_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


LOSSES = ("train/generator_loss", "train/critic_loss_video", "train/critic_loss_audio")


def losses(run, keys: tuple[str, ...] = LOSSES) -> dict[tuple[int, str], float]:
    rows = read_metrics(run / "csv" / "metrics.csv")
    return {(int(r["step"]), k): float(r[k]) for r in rows for k in keys if r.get(k)}


@pytest.fixture(scope="module")
def single(four_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_dmd(out, four_samples, devices=1, strategy="auto", batch_size=4)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_process(strategy, single, four_samples, tmp_path):
    # FSDP2: float32 gathered parameters, so it must equal one process up to reduction order
    extra = ("module.parallel.param_dtype=float32",) if strategy == "fsdp2" else ()
    run_dmd(tmp_path, four_samples, devices=2, strategy=strategy, batch_size=2, extra=extra)
    assert_match(single, tmp_path, four_samples, strategy, LOSSES, ("model", "critic", "ema"))


GAN = ("module.dmd.gan.enabled=true", "module.dmd.gan.layers=[0,-1]", "module.dmd.gan.generator_weight=1.0")
GAN_LOSSES = (*LOSSES, "train/critic_gan_d_loss", "train/critic_gan_r1", "train/generator_gan_g_loss")


@pytest.fixture(scope="module")
def single_gan(four_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_gan")
    run_dmd(out, four_samples, devices=1, strategy="auto", batch_size=4, extra=GAN)
    return out


def test_fsdp2_with_the_gan_term_and_the_teacher_offloaded_matches_one_process(
    single_gan, four_samples, tmp_path
):
    """The head sharded beside the critic (hooks on sharded layers, activation checkpointing on),
    and the teacher's shards under CPUOffloadPolicy: the same losses and weights as one process."""
    extra = (*GAN, "module.dmd.teacher_offload=true", "module.parallel.param_dtype=float32",
             "module.parallel.activation_checkpointing=true")  # fmt: skip
    run_dmd(tmp_path, four_samples, devices=2, strategy="fsdp2", batch_size=2, extra=extra)
    roots = ("model", "critic", "ema", "gan")
    # (the GAN term's gradients, through the critic, leave a few elements per tensor near 0)
    assert_match(single_gan, tmp_path, four_samples, "fsdp2", GAN_LOSSES, roots, sign_flips=1e-3)


def assert_match(single, multi, four_samples, strategy, keys, roots, sign_flips: float = 0.0):
    """Losses and weights of a 2-process run equal one process's. `sign_flips`: the share of
    elements allowed to differ by one Adam step either way (2 lr): where a gradient element is ~0,
    reduction order can flip its sign, and Adam's first steps move it by lr whatever its size."""
    want, got = losses(single, keys), losses(multi, keys)
    assert len(want) == 2 * len(keys) and want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
    last = multi / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (strategy == "fsdp2")
    w_single, _ = read_training_checkpoint(single / "checkpoints" / "last.ckpt")
    if strategy == "fsdp2":  # (read_training_checkpoint reads only model and ema from a DCP directory)
        w_multi = read_dcp_networks(last, roots=tuple(f"{r}." for r in roots))
    else:
        w_multi, _ = read_training_checkpoint(last)
    assert {k.split(".")[0] for k in w_single} == set(roots)
    assert w_single.keys() == w_multi.keys()
    # Adam (betas (0, 0.999)) takes ~lr-sized steps: 1e-3 per step here, so unsynchronised
    # gradients would differ by ~1e-3; reduction order moves an element by ~1e-5 at most
    start = load_official(MagiHumanDiT(tiny()), four_samples / "teacher").state_dict()
    for root in ("model", "critic"):
        moved = w_single[f"{root}.final_linear_video.weight"] - start["final_linear_video.weight"]
        assert moved.abs().max() > 1e-3, root
    for k in w_single:
        if not sign_flips:
            torch.testing.assert_close(w_multi[k], w_single[k], atol=5e-5, rtol=1e-4, msg=k)
            continue
        diff = (w_multi[k].float() - w_single[k].float()).abs()
        off = diff > 5e-5 + 1e-4 * w_single[k].float().abs()
        assert off.float().mean() <= sign_flips and diff.max() <= 2.1e-3, (k, int(off.sum()), diff.max())


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory):
    """Four LR/HR latent pairs (SR x2) and a tiny SR teacher (the same seed as `four_samples`')."""
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("four_pairs")
    make_latent_dataset(out, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2)
    torch.manual_seed(5)
    save_official(MagiHumanDiT(tiny()), out / "teacher")
    return out


SR_LOSSES = ("train/generator_loss", "train/critic_loss_video")  # (no audio is sampled in SR)
TREAD = ("module.tread.rate=0.5",)  # issue 26 in the same runs: the routes are per sample too


@pytest.fixture(scope="module")
def single_sr(four_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_sr")
    run_dmd(out, four_pairs, devices=1, strategy="auto", batch_size=4, extra=TREAD, recipe="sr_dmd2_540p")
    return out


@pytest.mark.parametrize(
    ("strategy", "batch_size", "extra"),
    [
        ("ddp", 2, ()),
        ("fsdp2", 4, ("strategy.context_parallel=2", "module.parallel.param_dtype=float32")),
    ],
    ids=["ddp", "fsdp2-cp2"],
)
def test_sr_distillation_on_two_processes_matches_one_process(
    strategy, batch_size, extra, four_pairs, tmp_path
):
    """Issue 25: `recipe=sr_dmd2_540p` under 2-process DDP (2 samples a rank) and FSDP2 with
    dp=1 x cp=2 (both ranks the same 4 samples, half the sequence each): the source's and the
    fixed audio input's draws are per sample, so losses and the three networks equal one process."""
    single = tmp_path / "single"
    run_dmd(single, four_pairs, devices=1, strategy="auto", batch_size=4, recipe="sr_dmd2_540p")
    multi = tmp_path / "multi"
    run_dmd(multi, four_pairs, 2, strategy, batch_size, extra=extra, recipe="sr_dmd2_540p")
    if strategy == "fsdp2":
        assert "Ulysses context parallelism: dp=1 x cp=2" in "".join(
            p.read_text() for p in multi.glob("*.log")
        )
    assert_match(single, multi, four_pairs, strategy, SR_LOSSES, ("model", "critic", "ema"))


@pytest.mark.parametrize(("devices", "strategy"), [(1, "auto"), (2, "ddp"), (2, "fsdp2")])
def test_bf16_mixed_runs_the_student_and_the_critic_in_bf16(devices, strategy, four_samples, tmp_path):
    """trainer.precision=bf16-mixed: the student's and the critic's block linears compute in bf16
    under every strategy. `_velocity` wrapped them in `torch.autocast(enabled=False)`, which
    switched the trainer's autocast off: float32 on one device and under DDP (FSDP2's bf16
    parameters hid it). A float32 teacher (`dmd.teacher_dtype=float32`) stays float32 off FSDP2."""
    probe = (
        "+callbacks.probe._target_=tests.precision_probe.BlockLinearDtypes",
        f"+callbacks.probe.out={tmp_path}",
    )
    extra = ("trainer.precision=bf16-mixed", "trainer.max_steps=1", "module.dmd.ttur=1", *probe)
    run_dmd(tmp_path / "run", four_samples, devices, strategy, batch_size=2, extra=extra)
    for rank in range(devices):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["model"] == seen["critic"] == ["torch.bfloat16"], seen
        if strategy != "fsdp2":  # (FSDP2 gathers every network's blocks in module.parallel.param_dtype)
            assert seen["teacher"] == ["torch.float32"], seen
