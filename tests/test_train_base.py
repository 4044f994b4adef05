"""The base flow-matching recipe end to end on CPU: configs, a fast run, overfitting, exact resume,
W&B offline, export -> load_official, atomic checkpoints."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train
from hydra.utils import instantiate

from magitrain.checkpoint import load_official
from magitrain.checkpoint.atomic_io import AtomicCheckpointIO
from magitrain.checkpoint.export import export
from magitrain.launch import train
from magitrain.model import MagiHumanDiT

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml"))


def tiny_run(shards: Path, *extra: str) -> list[str]:
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


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def step_losses(path: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(path) if r.get("train/loss")}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_every_recipe_and_model_preset_composes_and_builds(recipe, model, tmp_path):
    cfg = compose_train([f"recipe={recipe}", f"model={model}"], tmp_path)
    module = instantiate(cfg.module)  # networks are built lazily in configure_model: cheap at 15B
    assert module.model_config.num_layers == instantiate(cfg.model).num_layers


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes(strategy, tmp_path):
    from magitrain.launch import build_strategy

    cfg = compose_train([f"strategy={strategy}"], tmp_path)
    assert cfg.strategy.name == strategy
    if strategy in ("auto", "ddp", "fsdp2"):  # DeepSpeed's strategy object is built on GPU machines only
        build_strategy(cfg.strategy)


def test_fast_run_logs_every_metric_and_checkpoints(latent_shards, tmp_path):
    trainer = train(compose_train(tiny_run(latent_shards), tmp_path))
    assert trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    keys = set().union(*(r.keys() for r in read_metrics(tmp_path / "csv" / "metrics.csv")))
    for key in (
        "train/loss",
        "train/loss_video",
        "train/loss_audio",
        "train/grad_norm",
        "lr-AdamW",
        "perf/samples_per_s",
        "perf/tokens_per_s",
        "perf/mfu",
    ):
        assert key in keys
    assert any(k.startswith("train/loss_s") for k in keys)


def test_overfitting_one_batch_lowers_the_loss(tmp_path):
    from magitrain.data.synthetic import make_latent_dataset

    one_batch = tmp_path / "shards"  # two samples: every step sees the same batch of 2
    make_latent_dataset(one_batch, num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    overrides = tiny_run(
        one_batch,
        "trainer.max_steps=250",
        "trainer.max_steps=150",
        "trainer.log_every_n_steps=1",
        "module.optim.lr=3e-3",
        "module.optim.warmup_steps=10",
        "module.optim.schedule=constant",
        "module.flow.p_drop_text=0",
        "module.flow.p_image=0",
        "callbacks.ema=null",
    )
    train(compose_train(overrides, tmp_path / "run"))
    losses = list(step_losses(tmp_path / "run" / "csv" / "metrics.csv").values())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.7 * first, (first, last)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_a_killed_run_resumes_exactly(latent_shards, tmp_path):
    """6 steps straight == a `train.py` process SIGKILLed after its step-2 checkpoint + a resume."""
    overrides = tiny_run(
        latent_shards,
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    straight = tmp_path / "straight"
    train(compose_train(overrides, straight))

    killed = tmp_path / "killed"
    step2 = killed / "checkpoints" / "step00000002.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not step2.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step2.exists(), "the run died before writing its step-2 checkpoint"
    train(compose_train([*overrides, f"ckpt_path={step2}", "logger.csv.name=csv_resumed"], killed))

    want, got = (
        _weights(straight / "checkpoints" / "last.ckpt"),
        _weights(killed / "checkpoints" / "last.ckpt"),
    )
    assert want.keys() == got.keys() and any(k.startswith("ema.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    straight_losses = step_losses(straight / "csv" / "metrics.csv")
    resumed = step_losses(killed / "csv_resumed" / "metrics.csv")
    assert sorted(resumed) == [2, 3, 4, 5]
    assert all(resumed[s] == straight_losses[s] for s in resumed)


def test_export_loads_with_load_official_and_gives_identical_outputs(latent_shards, tmp_path):
    trainer = train(compose_train(tiny_run(latent_shards), tmp_path / "run"))
    module = trainer.lightning_module
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 48, 3, 4, 6, generator=g),
        torch.randn(1, 9, 64, generator=g),
        torch.randn(1, 5, 64, generator=g),
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for use_ema, network in ((False, module.model), (True, module.ema)):
        out = export(ckpt, tmp_path / f"export_{use_ema}", ema=use_ema)
        loaded = load_official(MagiHumanDiT(module.model_config), out).eval()
        with torch.no_grad():
            for a, b in zip(loaded(*inputs), network.eval()(*inputs), strict=True):
                assert torch.equal(a, b)
    assert not torch.equal(module.ema.final_linear_video.weight, module.model.final_linear_video.weight)


def test_export_without_ema_weights_says_so(latent_shards, tmp_path):
    train(compose_train(tiny_run(latent_shards, "callbacks.ema=null"), tmp_path / "run"))
    with pytest.raises(KeyError, match="no EMA weights"):
        export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "out", ema=True)


def test_wandb_offline_run_holds_the_logged_keys(latent_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_train(tiny_run(latent_shards, "logger=wandb", "trainer.log_every_n_steps=1"), tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run file holds its history as uncompressed protobuf records: the keys are there verbatim
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (
        "train/loss",
        "train/loss_video",
        "train/loss_audio",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/mfu",
        "lr-AdamW",
    ):
        assert key.encode() in records, key
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert runs[0].name.endswith(ckpt["wandb_run_id"])


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)  # lambdas do not pickle
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_init_loads_a_released_checkpoint_strictly(latent_shards, tmp_path):
    from magitrain.checkpoint import CheckpointMismatchError, save_official
    from magitrain.model import golden_tiny, tiny

    torch.manual_seed(3)
    released = save_official(MagiHumanDiT(tiny()), tmp_path / "released")
    trainer = train(
        compose_train(tiny_run(latent_shards, f"init={released}", "trainer.max_steps=1"), tmp_path / "a")
    )
    assert trainer.global_step == 1
    wrong = save_official(MagiHumanDiT(golden_tiny()), tmp_path / "wrong")
    with pytest.raises(CheckpointMismatchError, match="wrongly shaped"):
        train(compose_train(tiny_run(latent_shards, f"init={wrong}"), tmp_path / "b"))
