"""Inference against training: a 2-step tiny run with the validation callback logs mp4s to W&B
(offline), and its Lightning checkpoint loads as `ckpt` with EMA or raw weights."""

from __future__ import annotations

import csv
import json

import av
import pytest
import torch
from conftest import compose_train, tiny_run

from magitrain.callbacks import Validation
from magitrain.eval.evaluate import EvalOptions, Evaluator
from magitrain.inference import ClipShape, MagiHumanPipeline, StageTimer, load_network
from magitrain.launch import train


@pytest.fixture(scope="module")
def run(latent_shards, tmp_path_factory):
    """(trainer, run dir) of 2 steps with validation samples after each step, W&B offline."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        overrides = tiny_run(
            latent_shards, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
            "logger=wandb", "codecs=tiny", "callbacks=validation", "callbacks.progress_bar=null",
            "callbacks.validation.every_n_steps=1", "callbacks.validation.prompts=[A dog barks twice]",
            "callbacks.validation.seconds=0.32", "callbacks.validation.resolution=64x32",
        )  # fmt: skip
        return train(compose_train(overrides, out)), out


def test_validation_samples_are_saved_and_logged_to_wandb(run):
    trainer, out = run
    for step in (1, 2):
        clip = out / "validation" / f"step{step:08d}" / "sample0.mp4"
        with av.open(str(clip)) as container:
            assert container.streams.video[0].frames == 9 and len(container.streams.audio) == 1
    wandb_run = next((out / "wandb").glob("offline-run-*"))
    # W&B stores each logged video under its key; its history file may still be flushing here
    logged = list((wandb_run / "files" / "media" / "videos" / "val").glob("samples_*.mp4"))
    assert len(logged) == 2  # one per validation step
    with av.open(str(logged[0])) as container:
        assert len(container.streams.audio) == 1  # the sound went along


def test_validation_scores_go_to_csv_and_a_wandb_table(run):
    """Each validation step logs the magitrain.eval scores of its clip (the mean over the prompts:
    one prompt here) to the CSV, equal to scoring the saved mp4 with the eval command's evaluator,
    and a W&B table of video, prompt and scores."""
    _, out = run
    with open(out / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/samples/av_confidence")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        clip = out / "validation" / f"step{int(row['step']):08d}" / "sample0.mp4"
        scores = {k: v for k, v in Evaluator(EvalOptions()).score(clip).items() if v is not None}
        assert {"av_confidence", "flicker", "frozen_ratio", "silence_ratio", "duration_mismatch_s"} <= set(
            scores
        )
        for metric, value in scores.items():
            assert float(row[f"val/samples/{metric}"]) == pytest.approx(value, rel=1e-6, abs=1e-12), metric
    wandb_run = next((out / "wandb").glob("offline-run-*"))
    tables = sorted((wandb_run / "files" / "media" / "table" / "val").glob("samples_table_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:2] == ["video", "prompt"] and "av_confidence" in table["columns"]
    assert table["data"][0][1] == "A dog barks twice"


def test_validation_metrics_option():
    """metrics: true scores with the weight-free metrics, false scores nothing, a dict sets the eval
    options, and a mistyped key is an error naming the known ones."""
    assert Validation(["x"]).evaluator.options == EvalOptions()
    assert Validation(["x"], metrics=False).evaluator is None
    assert Validation(["x"], metrics={"max_lag": 4}).evaluator.options.max_lag == 4
    with pytest.raises(ValueError, match="metrics has no key 'asr_pth'; its keys: asr_path, clip_path"):
        Validation(["x"], metrics={"asr_pth": "/ckpt/whisper"})


def test_validation_leaves_the_rng_and_train_mode_alone(run):
    trainer, _ = run
    module = trainer.lightning_module
    callback = next(c for c in trainer.callbacks if isinstance(c, Validation))
    trainer.loggers = []  # the run's W&B logger is finished; this extra sample only goes to disk
    callback._last_step = -1
    module.train()
    rng = torch.get_rng_state()
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert module.ema.training and module.model.training


def test_a_training_checkpoint_loads_with_ema_or_raw_weights(run, tmp_path):
    _, out = run
    ckpt = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    name = "block.layers.1.mlp.up_gate_proj.weight"
    assert not torch.equal(state[f"model.{name}"], state[f"ema.{name}"])  # decay 0.9999: they differ

    auto, ema, raw = (load_network(ckpt, weights=w) for w in ("auto", "ema", "raw"))  # tiny from hparams
    assert auto.config.hidden_size == 64
    torch.testing.assert_close(auto.state_dict()[name], state[f"ema.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(ema.state_dict()[name], state[f"ema.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(raw.state_dict()[name], state[f"model.{name}"], rtol=0, atol=0)

    # Without EMA weights, auto falls back to the raw ones and asking for EMA says why it can't.
    no_ema = torch.load(ckpt, map_location="cpu", weights_only=False)
    no_ema["state_dict"] = {k: v for k, v in no_ema["state_dict"].items() if not k.startswith("ema.")}
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    fallback = load_network(tmp_path / "no_ema.ckpt")
    torch.testing.assert_close(fallback.state_dict()[name], state[f"model.{name}"], rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"ckpt=.*no_ema.ckpt: the checkpoint holds no EMA weights"):
        load_network(tmp_path / "no_ema.ckpt", weights="ema")

    # The loaded network samples through the pipeline (codecs of the run: tiny).
    pipe = MagiHumanPipeline(raw.eval(), run[0].lightning_module.codecs, device="cpu")
    text = pipe.encode_prompt("A dog barks twice", guidance=False)
    video, audio = pipe.sample(text, ClipShape.of(0.32, "64x32"), StageTimer("cpu"), seed=0)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
