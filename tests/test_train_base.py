"""The base flow-matching recipe end to end on CPU: configs, a fast run, overfitting, exact resume,
W&B offline, export -> load_official, atomic checkpoints."""

from __future__ import annotations

import csv
import pickle
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import REPO, compose_train, straight_and_resumed, tiny_run
from hydra.utils import instantiate
from omegaconf import OmegaConf

from magitrain.checkpoint import load_official
from magitrain.checkpoint.atomic_io import AtomicCheckpointIO
from magitrain.checkpoint.export import export
from magitrain.launch import train
from magitrain.model import MagiHumanDiT

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml"))
OPTIONAL = [
    f"{group}={p.stem}"
    for group in ("experiment", "debug", "data", "codecs", "logger", "callbacks")
    for p in sorted((REPO / "conf" / group).glob("*.yaml"))
]


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def step_losses(path: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(path) if r.get("train/loss")}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_every_recipe_and_model_preset_composes_and_builds(recipe, model, tmp_path):
    from magitrain.model import get_config

    cfg = compose_train([f"recipe={recipe}", f"model={model}"], tmp_path)
    module = instantiate(cfg.module)  # networks are built lazily in configure_model: cheap at 15B
    assert module.model_config == get_config(model)  # the preset the file is named after


@pytest.mark.parametrize("option", OPTIONAL)
def test_every_config_option_composes_and_resolves(option, tmp_path):
    # the fields a user must set (`???`) for the real codecs and any data
    required = ["data.shards='/data/{000000..000009}.tar'"]
    if option == "codecs=magihuman":
        required += [
            f"codecs.{f}=/ckpt/{f}" for f in ("video_vae_path", "audio_vae_path", "text_encoder_path")
        ]
    cfg = compose_train([option, *required], tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes(strategy, tmp_path):
    from magitrain.launch import build_strategy

    cfg = compose_train([f"strategy={strategy}"], tmp_path)
    built = build_strategy(cfg.strategy)
    # as far as a CPU allows: a trainer takes it with bf16-mixed (DeepSpeed refuses the CPU in fit)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=built, precision="bf16-mixed", logger=False)
    expected = {"auto": "SingleDeviceStrategy", "ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}
    assert type(trainer.strategy).__name__ == expected.get(strategy, "DeepSpeedStrategy")
    if strategy.startswith("deepspeed_zero"):
        assert trainer.strategy.config["zero_optimization"]["stage"] == int(strategy[-1])
        assert type(trainer.precision_plugin).__name__ == "DeepSpeedPrecision"


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


def test_losses_are_logged_when_a_data_epoch_is_shorter_than_the_logging_interval(latent_shards, tmp_path):
    """The CPU demo's metrics.csv had no loss: logging was keyed on batch_idx, which restarts every
    data epoch (8 batches there, 4 here), so logging every 10 (5 here) steps never fired."""
    bucket = "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 4}]"  # 4 batches per epoch
    overrides = [*tiny_run(latent_shards), bucket, "trainer.max_steps=5", "trainer.log_every_n_steps=5"]
    train(compose_train([*overrides, "callbacks.ema=null"], tmp_path))
    assert list(step_losses(tmp_path / "csv" / "metrics.csv")) == [4]  # the 5th step, 0-based


def _probe_loss(model, batch) -> float:
    """Flow loss on fixed noise levels and noise: a deterministic measure of fit to one batch."""
    x0_v, x0_a = batch["video_latent"].float(), batch["audio_latent"].float()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for s in (0.2, 0.5, 0.8):
            eps_v, eps_a = torch.randn(x0_v.shape, generator=g), torch.randn(x0_a.shape, generator=g)
            v_v, v_a = model(
                (1 - s) * x0_v + s * eps_v,
                (1 - s) * x0_a + s * eps_a,
                batch["text_emb"],
                text_len=batch["text_len"],
            )
            total += ((v_v - (eps_v - x0_v)).pow(2).mean() + (v_a - (eps_a - x0_a)).pow(2).mean()).item()
    return total / 3


def test_overfitting_one_batch_lowers_the_loss(tmp_path):
    from magitrain.checkpoint import save_official
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.model import tiny

    one_batch = tmp_path / "shards"  # two 1-frame samples, repeated 100 times an epoch (no epoch overhead)
    make_latent_dataset(one_batch, num_samples=2, per_shard=2, latent_shapes=((1, 2, 2),), text_dim=64)
    torch.manual_seed(0)
    start = MagiHumanDiT(tiny())
    init = save_official(start, tmp_path / "init")
    overrides = tiny_run(
        one_batch,
        f"init={init}",
        "trainer.max_steps=200",
        "data.shards=null",
        f"data.datasets=[{{name: one, shards: '{one_batch}/*.tar', weight: 100}}]",
        "data.buckets=[{height: 32, width: 32, frames: 1, batch_size: 2}]",
        "module.optim.lr=3e-3",
        "module.optim.warmup_steps=10",
        "module.optim.schedule=constant",
        "module.flow.p_drop_text=0",
        "module.flow.p_image=0",
        "callbacks.ema=null",
    )
    trainer = train(compose_train(overrides, tmp_path / "run"))
    batch = next(iter(trainer.datamodule.train_dataloader()))
    before, after = (
        _probe_loss(start.eval(), batch),
        _probe_loss(trainer.lightning_module.model.eval(), batch),
    )
    assert after < 0.7 * before, (before, after)  # measured: 3.86 -> 2.26


def test_a_killed_run_resumes_exactly(latent_shards, tmp_path):
    """20 steps straight == a `train.py` process SIGKILLed after its step-2 checkpoint + a resume."""
    overrides = tiny_run(
        latent_shards,
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    straight, resumed, step2 = straight_and_resumed(overrides, tmp_path)

    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("ema.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    straight_losses = step_losses(tmp_path / "straight" / "csv" / "metrics.csv")
    resumed_losses = step_losses(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
    assert sorted(resumed_losses) == list(range(2, 20))
    assert all(resumed_losses[s] == straight_losses[s] for s in resumed_losses)


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
    # The offline run file holds its history as uncompressed protobuf records, the keys verbatim.
    # W&B's service process writes it asynchronously, so give it a few seconds after finish().
    keys = (
        "train/loss",
        "train/loss_video",
        "train/loss_audio",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/mfu",
        "lr-AdamW",
    )
    run_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30
    while not all(k.encode() in run_file.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = run_file.read_bytes()
    for key in keys:
        assert key.encode() in records, key
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert runs[0].name.endswith(ckpt["wandb_run_id"])


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)  # lambdas do not pickle
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_init_loads_a_released_checkpoint_strictly(latent_shards, tmp_path):
    from magitrain.checkpoint import CheckpointMismatchError, save_official
    from magitrain.model import golden_tiny, tiny

    torch.manual_seed(3)
    released = save_official(MagiHumanDiT(tiny()), tmp_path / "released")
    trainer = train(
        compose_train(tiny_run(latent_shards, f"init={released}", "trainer.max_steps=2"), tmp_path / "a")
    )
    assert trainer.global_step == 2
    wrong = save_official(MagiHumanDiT(golden_tiny()), tmp_path / "wrong")
    with pytest.raises(CheckpointMismatchError, match="wrongly shaped"):
        train(compose_train(tiny_run(latent_shards, f"init={wrong}"), tmp_path / "b"))
