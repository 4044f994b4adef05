"""Training arithmetic with real Lightning trainers on CPU: the EMA's decay, start step, interval and
gradient accumulation, accumulation equalling the large batch, and the throughput window."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, tiny_run
from lightning.pytorch import Callback
from test_train_base import read_metrics

from magitrain.callbacks import EMA
from magitrain.launch import train


class WeightRecorder(Callback):
    """The network's float32 weights at the start and after every optimiser step."""

    def __init__(self):
        self.weights: dict[int, list[torch.Tensor]] = {}

    def _record(self, trainer, pl_module):
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.model.parameters()]

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step not in self.weights:
            self._record(trainer, pl_module)


def run(tmp_path, shards, *extra):
    overrides = tiny_run(
        shards,
        "data.shuffle=false",
        "+callbacks.recorder._target_=test_model_training.WeightRecorder",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        *extra,
    )
    trainer = train(compose_train(overrides, tmp_path))
    recorder = next(c for c in trainer.callbacks if isinstance(c, WeightRecorder))
    return trainer, recorder.weights


def test_ema_decay_start_step_interval_and_accumulation(latent_shards, tmp_path):
    decay, start, every = 0.5, 2, 2
    trainer, weights = run(
        tmp_path, latent_shards, "trainer.max_steps=5", "trainer.accumulate_grad_batches=2",
        f"callbacks.ema.decay={decay}", f"callbacks.ema.start_step={start}",
        f"callbacks.ema.every_n_steps={every}",
    )  # fmt: skip
    assert sorted(weights) == [0, 1, 2, 3, 4, 5]
    shadow = weights[0]  # configure_model copies the initial weights
    for step in range(1, 6):  # per optimiser step, never per micro-batch
        if step <= start or step % every == 0:
            d = 0.0 if step < start else decay
            shadow = [s + (1 - d) * (w - s) for s, w in zip(shadow, weights[step], strict=True)]
    ema = list(trainer.lightning_module.ema.parameters())
    assert all(e.dtype == torch.float32 for e in ema)
    for got, want in zip(ema, shadow, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    # and it is not simply the last weights (the arithmetic above is not vacuous)
    assert any(not torch.allclose(e, w) for e, w in zip(ema, weights[5], strict=True))


def test_ema_update_moves_a_float32_shadow_by_tiny_weights():
    """With decay 0.9999 a bf16 shadow would never move; the batched float32 update does."""
    from magitrain.model import MagiHumanDiT, tiny

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = MagiHumanDiT(tiny())
            self.ema = MagiHumanDiT(tiny()).to(torch.bfloat16)  # as DeepSpeed's bf16 mode leaves it

    holder = Holder()
    holder.ema.load_state_dict(holder.model.state_dict())
    with torch.no_grad():
        for p in holder.model.parameters():
            p.add_(1.0)
    callback = EMA(decay=0.9999)
    callback.on_fit_start(None, holder)
    assert all(p.dtype == torch.float32 for p in holder.ema.parameters())
    before = [p.clone() for p in holder.ema.parameters()]
    for step in range(1, 11):
        callback.update(holder, step)
    for b, a in zip(before, holder.ema.parameters(), strict=True):
        torch.testing.assert_close(a - b, torch.full_like(a, 1 - 0.9999**10), atol=2e-6, rtol=1e-3)


def test_gradient_accumulation_equals_the_large_batch(latent_shards, tmp_path):
    buckets = "data.buckets=[{{height: 64, width: 96, frames: 9, batch_size: {}}}]"
    _, large = run(tmp_path / "large", latent_shards, "trainer.max_steps=2", buckets.format(4))
    _, accumulated = run(
        tmp_path / "acc",
        latent_shards,
        "trainer.max_steps=2",
        buckets.format(2),
        "trainer.accumulate_grad_batches=2",
    )
    for step in (1, 2):
        for a, b in zip(accumulated[step], large[step], strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(large[2], large[0], strict=True))  # it trained


def test_throughput_logs_once_per_window_with_consistent_mfu(latent_shards, tmp_path):
    run(tmp_path, latent_shards, "trainer.max_steps=4", "trainer.log_every_n_steps=2")
    rows = [r for r in read_metrics(tmp_path / "csv" / "metrics.csv") if r.get("perf/mfu")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        tflops, mfu = float(r["perf/tflops_per_device"]), float(r["perf/mfu"])
        assert mfu == pytest.approx(tflops / 989.0)
        assert float(r["perf/tokens_per_s"]) > float(r["perf/samples_per_s"]) > 0


def test_validation_samples_with_the_recipes_sampler():
    """A base model is validated as it is sampled: 32-step UniPC with CFG, not the distilled 8 steps."""
    from magitrain.callbacks import Validation
    from magitrain.model import tiny
    from magitrain.recipes import FlowMatchingModule

    module = FlowMatchingModule(tiny())
    assert Validation(prompts=["a"]).sampling_for(module) == {"steps": 32, "sampler": "base"}
    assert Validation(prompts=["a"], steps=8).sampling_for(module) == {"steps": 8}
    with pytest.raises(ValueError, match="names no validation sampler"):
        Validation(prompts=["a"]).sampling_for(torch.nn.Module())
