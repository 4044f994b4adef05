"""Real multi-process training on CPU (gloo): DDP and FSDP2 match one process on the same global batch.

Each distributed run is `python train.py ...` in a subprocess, as a user launches it; Lightning
starts the second rank itself (the one-process reference runs in the test's process). The same 4
samples form the global batch: one process takes them as one batch of 4, two ranks as two batches
of 2. Noise is drawn per sample key, so the losses and the
updated weights must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_train
from test_train_base import step_losses
from torch.distributed.checkpoint import FileSystemReader

from magitrain.checkpoint import save_official
from magitrain.checkpoint.export import network_state, read_dcp_networks, read_training_checkpoint
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four_samples(tmp_path_factory):
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("four")
    make_latent_dataset(out, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    torch.manual_seed(5)  # every run starts from these weights (FSDP2 initialises shards differently)
    save_official(MagiHumanDiT(tiny()), out / "init")
    return out


def run_train(
    out_dir, shards, devices: int, strategy: str, batch_size: int, extra: tuple[str, ...] = ()
) -> None:
    overrides = [
        "model=tiny",
        "trainer=cpu",
        f"trainer.devices={devices}",
        f"strategy={strategy}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "module.optim.warmup_steps=1",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"data.shards={shards}/*.tar",
        "data.num_workers=0",
        "data.shuffle=false",
        f"data.buckets=[{{height: 64, width: 96, frames: 9, batch_size: {batch_size}}}]",
        f"init={shards}/init",
        *extra,
    ]
    if devices == 1:  # the reference run, in this process (a process of its own costs its imports)
        train(compose_train(overrides, out_dir))
        return
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={out_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def assert_runs_match(single, dist) -> None:
    """Two runs of train.py agree: the losses of steps 0 and 1, and the weights of last.ckpt."""
    from test_train_base import step_losses

    want, got = step_losses(single / "csv" / "metrics.csv"), step_losses(dist / "csv" / "metrics.csv")
    assert sorted(got) == [0, 1]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    w_single = model_weights(single / "checkpoints" / "last.ckpt")
    w_dist = model_weights(dist / "checkpoints" / "last.ckpt")
    for k in w_single:
        torch.testing.assert_close(w_dist[k], w_single[k], atol=1e-5, rtol=1e-4, msg=k)


# EMA with decay 0.5 updated at step 2 only: the shadow must be (init + weights after step 2) / 2
EMA_EVERY_2 = ("callbacks.ema.decay=0.5", "callbacks.ema.every_n_steps=2")


def model_weights(ckpt, ema: bool = False) -> dict[str, torch.Tensor]:
    state, _ = read_training_checkpoint(ckpt)
    return network_state(state, ema=ema)


def assert_ema_is_the_mean_of_init_and_step_2(ckpt, init_dir) -> None:
    from magitrain.checkpoint import load_official

    init = load_official(MagiHumanDiT(tiny()), init_dir).state_dict()
    weights, shadow = model_weights(ckpt), model_weights(ckpt, ema=True)
    assert all(v.dtype == torch.float32 for v in shadow.values())
    for k in weights:
        torch.testing.assert_close(shadow[k], (init[k] + weights[k]) / 2, atol=1e-6, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(four_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_train(out, four_samples, devices=1, strategy="auto", batch_size=4, extra=EMA_EVERY_2)
    return out


def test_ddp_two_processes_match_one_process(single, four_samples, tmp_path):
    run_train(tmp_path, four_samples, devices=2, strategy="ddp", batch_size=2)
    want, got = step_losses(single / "csv" / "metrics.csv"), step_losses(tmp_path / "csv" / "metrics.csv")
    assert sorted(got) == [0, 1]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    w_single, w_ddp = (
        model_weights(single / "checkpoints" / "last.ckpt"),
        model_weights(tmp_path / "checkpoints" / "last.ckpt"),
    )
    for k in w_single:
        torch.testing.assert_close(w_ddp[k], w_single[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp2_two_processes_match_one_process(single, four_samples, tmp_path):
    # float32 gathered parameters so FSDP2 must equal the single process up to reduction order
    run_train(
        tmp_path,
        four_samples,
        devices=2,
        strategy="fsdp2",
        batch_size=2,
        extra=("module.parallel.param_dtype=float32", *EMA_EVERY_2),
    )
    want, got = step_losses(single / "csv" / "metrics.csv"), step_losses(tmp_path / "csv" / "metrics.csv")
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a distributed checkpoint: one shard file per rank
    w_single, w_fsdp = model_weights(single / "checkpoints" / "last.ckpt"), model_weights(last)
    assert w_single.keys() == w_fsdp.keys()
    for k in w_single:
        torch.testing.assert_close(w_fsdp[k], w_single[k], atol=1e-5, rtol=1e-4, msg=k)
    # the sharded float32 EMA: the same arithmetic as one process
    assert_ema_is_the_mean_of_init_and_step_2(last, four_samples / "init")
    assert_ema_is_the_mean_of_init_and_step_2(single / "checkpoints" / "last.ckpt", four_samples / "init")
    # export reads the networks only, not the optimiser state beside them (3x the weights at 15B)
    stored = FileSystemReader(last).read_metadata().state_dict_metadata
    assert any(not k.startswith("state_dict.") for k in stored)
    assert all(k.startswith(("model.", "ema.")) for k in read_dcp_networks(last))
