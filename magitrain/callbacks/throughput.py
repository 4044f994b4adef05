"""Throughput, MFU and memory: samples/s, tokens/s, `mfu = flops_per_token * tokens_per_s / peak`."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

from magitrain.model.flops import training_flops_per_token


class Throughput(Callback):
    def __init__(self, peak_tflops: float = 989.0, log_every_n_steps: int = 1):
        """peak_tflops: the device's dense bf16 peak (H100 SXM: 989), used for MFU."""
        self.peak_flops = peak_tflops * 1e12
        self.log_every_n_steps = log_every_n_steps
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None or trainer.global_step % self.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start
        samples, seq_len = pl_module.batch_shape(batch)
        world = trainer.world_size
        tokens_per_s = samples * seq_len * world / seconds
        flops_per_token = training_flops_per_token(pl_module.model_config, seq_len)
        metrics = {
            "perf/samples_per_s": samples * world / seconds,
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": flops_per_token * tokens_per_s / (self.peak_flops * world),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
