"""Shared test fixtures: the golden fixtures of the released implementation, found beside the repo."""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"

# Toy-sized tensors run fastest on one thread, and OpenMP threads spinning on an oversubscribed
# 2-core machine slow every op several-fold. Subprocess runs get OMP_NUM_THREADS=1 likewise.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The released implementation's fixtures. CI (CI=true) must have them: there a missing folder
    fails the parity tests instead of skipping them; a user's bare clone skips them."""
    if not (GOLDEN_DIR / "weights_tiny.safetensors").is_file():
        message = f"golden fixtures not found at {GOLDEN_DIR.resolve()} (expected ../shared/golden)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; CI=true requires them for the parity tests")
        pytest.skip(message)
    return GOLDEN_DIR


# The files that take minutes, longest first (CPU suite, two xdist workers, 2026-12-07: 60-200 s
# each). pyproject runs xdist with --no-loadscope-reorder, so the workers take whole files in this
# collection order: the long ones start first and no long file is left running alone at the end.
LONGEST_FIRST = (
    "test_dmd_toy.py",
    "test_slurm.py",
    "test_dmd_distributed.py",
    "test_inference_cp.py",
    "test_gpu.py",
    "test_optim_states.py",
    "test_quality_toy.py",
    "test_reliability_sharded.py",
    "test_context_parallel.py",
    "test_lora_ddp.py",
    "test_reliability_runs.py",
    "test_dmd_toy_controls.py",  # after test_dmd_toy.py has saved the teacher they share
    "test_cli.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """A script of the repo (scripts/*.py, data_tools/*.py) imported as a module named after its
    file, registered in sys.modules (its dataclasses and its workers' pickles look it up there)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script(monkeypatch, capfd):
    """`python SCRIPT ARGS` (train.py, infer.py) or `python -m MODULE ARGS` run as `__main__` in
    this process, where a subprocess costs seconds of imports: `script("infer.py", *args)` or
    `script("-m", "magitrain.plan", *args)` -> a CompletedProcess with its exit status and output.
    The logging state that Hydra's job and magitrain.cli change is restored afterwards."""
    monkeypatch.chdir(REPO)
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.Logger.manager.loggerDict))]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        for var in ("HYDRA_FULL_ERROR", "MAGITRAIN_VERBOSE"):
            monkeypatch.delenv(var, raising=False)  # magitrain.cli sets them
        module = args[0] if name == "-m" else None
        monkeypatch.setattr(sys, "argv", [module or name, *args[module is not None :]])
        capfd.readouterr()
        code = 0
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / name), run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([name, *args], code, out, err)

    yield run
    for lg, handlers, filters, level, propagate, disabled in saved:
        lg.handlers[:], lg.filters[:] = handlers, filters
        lg.level, lg.propagate, lg.disabled = level, propagate, disabled


def compose_train(overrides: list[str], output_dir: Path):
    """The resolved config `python train.py OVERRIDES` would run, writing into output_dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture(scope="session")
def latent_shards(tmp_path_factory) -> Path:
    """Latent shards for the tiny model (text width 64): 16 samples, 4 per shard, 3x4x6 latents."""
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("latent_shards")
    make_latent_dataset(out, num_samples=16, per_shard=4, latent_shapes=((3, 4, 6),), text_dim=64)
    return out


def tiny_run(shards: Path, *extra: str) -> list[str]:
    """train.py overrides of a fast tiny-model run on CPU over the given latent shards."""
    return [
        "model=tiny",
        "trainer=cpu",
        "debug=fast",
        "callbacks.progress_bar=null",
        f"data.shards={shards}/*.tar",
        "data.num_workers=0",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]",
        *extra,
    ]


def kill_after_checkpoint(overrides: list[str], run_dir: Path, ckpt: Path, timeout: float = 300) -> None:
    """Run `python train.py OVERRIDES` into run_dir and SIGKILL it as soon as `ckpt` exists."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), f"the run was killed before writing {ckpt.name}"


def straight_and_resumed(overrides: list[str], tmp_path: Path):
    """(straight, resumed, checkpoint): the run of `overrides` straight through, and the same run
    SIGKILLed in a `train.py` process after its step-2 checkpoint, then resumed from it."""
    from magitrain.launch import train

    straight = train(compose_train(overrides, tmp_path / "straight"))
    killed = tmp_path / "killed"
    step2 = killed / "checkpoints" / "step00000002.ckpt"
    kill_after_checkpoint(overrides, killed, step2)
    resumed = train(compose_train([*overrides, f"ckpt_path={step2}", "logger.csv.name=csv_resumed"], killed))
    return straight, resumed, step2
