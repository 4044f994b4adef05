"""Throughput, MFU and memory over each logging window: samples/s, tokens/s, TFLOP/s and MFU.

Nothing in a training step waits for the device: each rank adds its batch's real tokens and useful
FLOPs (magitrain.model.flops: text padding excluded, local attention counted by its window) as
device tensors. On logging steps only, the callback synchronises once, sums the window over ranks
in one collective and logs `mfu = useful FLOPs / (seconds x world x peak)`.

With token routing (`module.tread`), the FLOPs are the ones computed: the routed layers count the
kept tokens only (the module's `last_route`), so MFU stays honest; `perf/routed_fraction` is the
share of the window's real tokens that skipped the routed layers.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

from magitrain.data.prompts import latent_geometry
from magitrain.model import SequenceLayout
from magitrain.model.flops import real_tokens, set_aside_tokens, training_flops


def batch_layout(batch: dict, patch: tuple[int, int, int]) -> SequenceLayout:
    """The token layout of a latent or prompt batch (text and voice-reference lengths as they come,
    on their device)."""
    (_, T, H, W), (N, _) = latent_geometry(batch)
    pt, ph, pw = patch
    B, L = batch["text_emb"].shape[:2]
    R = batch["ref_audio_latent"].shape[1] if "ref_audio_latent" in batch else 0
    grid = (T // pt, H // ph, W // pw)
    return SequenceLayout(B, *grid, N, L, batch.get("text_len"), R, batch.get("ref_audio_len"))


class Throughput(Callback):
    def __init__(self, peak_tflops: float = 989.0, log_every_n_steps: int | None = None):
        """peak_tflops: the device's dense bf16 peak (H100 SXM: 989), used for MFU.
        log_every_n_steps: the window; default the trainer's `log_every_n_steps`."""
        self.peak_flops = peak_tflops * 1e12
        self.log_every_n_steps = log_every_n_steps
        self._window: torch.Tensor | None = None  # [samples, real tokens, FLOPs, set aside] on this rank
        self._start: float | None = None
        self._last_step = -1

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._start, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layout = batch_layout(batch, pl_module.model_config.patch_size)
        route = getattr(pl_module, "last_route", None)  # TREAD: the route of this batch's forward
        flops = training_flops(pl_module.model_config, layout, route)
        aside = torch.full_like(flops, set_aside_tokens(layout, route))
        counts = torch.stack([torch.full_like(flops, layout.batch), real_tokens(layout), flops, aside])
        self._window = counts if self._window is None else self._window + counts.to(self._window.device)
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step == self._last_step or step % every:  # accumulation micro-batch or not a logging step
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        window = trainer.strategy.reduce(self._window.to(pl_module.device), reduce_op="sum")
        samples, tokens, flops, aside = window.tolist()
        steps = step - self._last_step
        self._window, self._start, self._last_step = None, time.perf_counter(), step
        metrics = {
            "perf/samples_per_s": samples / seconds,
            "perf/tokens_per_s": tokens / seconds,
            "perf/tflops_per_device": flops / seconds / trainer.world_size / 1e12,
            "perf/mfu": flops / seconds / (self.peak_flops * trainer.world_size),
            "perf/s_per_step": seconds / steps,
        }
        tread = getattr(pl_module, "tread_config", None)
        if tread is not None and tread.enabled:
            metrics["perf/routed_fraction"] = aside / tokens
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
