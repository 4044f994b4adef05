"""Signals stop a real `python train.py` process without losing work: it saves the step reached,
exits 143, and `ckpt_path=last` resumes it bit-exactly (weights, EMA and the loss of every step)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, tiny_run
from test_train_base import step_losses

from magitrain.checkpoint.resume import checkpoint_meta
from magitrain.launch import train

STEPS = 12


def run_overrides(shards: Path) -> list[str]:
    return tiny_run(
        shards,
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "logger.csv.flush_logs_every_n_steps=1",  # the test watches the steps go by in metrics.csv
        "callbacks.model_checkpoint.every_n_train_steps=1000",  # only a signal (or the end) saves
    )


@pytest.fixture(scope="module")
def straight(latent_shards, tmp_path_factory):
    """The uninterrupted run: its final module state and its loss at every step."""
    out = tmp_path_factory.mktemp("straight")
    trainer = train(compose_train(run_overrides(latent_shards), out))
    return trainer.lightning_module.state_dict(), step_losses(out / "csv" / "metrics.csv")


def logged_steps(run_dir: Path) -> int:
    try:
        with open(run_dir / "csv" / "metrics.csv") as f:
            return max((int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")), default=-1)
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def start(run_dir: Path, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a scheduler's job step
    )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    assert condition(), f"timed out waiting for {what}"


def assert_resumes_exactly(run_dir: Path, overrides: list[str], straight) -> None:
    resumed = train(compose_train([*overrides, "ckpt_path=last"], run_dir))
    want, got = straight[0], resumed.lightning_module.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("ema.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # one metrics history spans the interruption: every step's loss, as the straight run logged it
    losses: dict[int, list[float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                losses.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    assert sorted(losses) == sorted(straight[1])
    assert all(v == [straight[1][s]] * len(v) for s, v in losses.items())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_the_step_reached_exits_143_and_resumes_exactly(
    signum, latent_shards, straight, tmp_path
):
    overrides = run_overrides(latent_shards)
    proc = start(tmp_path, overrides)
    wait_for(lambda: logged_steps(tmp_path) >= 2, proc, "step 2")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]

    saved = [p for p in (tmp_path / "checkpoints").glob("step*.ckpt")]
    assert len(saved) == 1, saved  # periodic checkpoints are off: this is the signal's
    step = checkpoint_meta(saved[0])["global_step"]
    assert 2 <= step < STEPS and saved[0].name == f"step{step:08d}.ckpt"
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve() == saved[0].resolve()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert_resumes_exactly(tmp_path, overrides, straight)


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{log}"
"""


def test_slurm_requeue_checkpoint_resumes_exactly_and_last_finds_it(latent_shards, straight, tmp_path):
    """Lightning's SLURM auto-requeue on SIGUSR1 (simulated: SLURM variables and a fake scontrol):
    its hpc_ckpt is taken between two steps, and `ckpt_path=last` resumes from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=requeued))
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "magitrain",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    run_dir = tmp_path / "run"
    overrides = run_overrides(latent_shards)
    proc = start(run_dir, overrides, slurm)
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: requeued.exists(), proc, "the requeue")
    proc.kill()  # SLURM kills the requeued job
    proc.communicate()

    assert requeued.read_text().split() == ["requeue", "4242"]
    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and not list((run_dir / "checkpoints").glob("step*.ckpt"))
    assert 2 <= checkpoint_meta(hpc[0])["global_step"] < STEPS
    assert_resumes_exactly(run_dir, overrides, straight)


@pytest.mark.slow
def test_sigterm_to_rank_0_stops_both_ddp_ranks_at_one_saved_step(latent_shards, tmp_path):
    """Only the launching process (rank 0) gets SIGTERM; rank 1, its child, learns it through the
    per-step reduction. Both save the same step and exit; neither waits for the other forever."""
    overrides = [
        *run_overrides(latent_shards),
        "trainer.devices=2",
        "strategy=ddp",
        "trainer.max_steps=40",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 1}]",
    ]
    proc = start(tmp_path, overrides)
    wait_for(lambda: logged_steps(tmp_path) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    (saved,) = (tmp_path / "checkpoints").glob("step*.ckpt")
    assert 2 <= checkpoint_meta(saved)["global_step"] < 40


def test_sigterm_to_the_whole_process_group_with_data_workers_still_saves(latent_shards, tmp_path):
    """SLURM signals every process of the job step, DataLoader workers included: the workers ignore
    it (a killed worker would make PyTorch abort the main process before it could save)."""
    overrides = [*run_overrides(latent_shards), "data.num_workers=1", "trainer.max_steps=40"]
    proc = start(tmp_path, overrides)
    wait_for(lambda: logged_steps(tmp_path) >= 2, proc, "step 2")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    (saved,) = (tmp_path / "checkpoints").glob("step*.ckpt")
    assert 2 <= checkpoint_meta(saved)["global_step"] < 40
