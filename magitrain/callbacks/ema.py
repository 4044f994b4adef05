"""Exponential moving average of the trained network in float32.

The shadow weights live in the LightningModule as a frozen copy of the network (`module.ema`),
built in `configure_model` and sharded by the same plan as the network. That way they are part
of the model state dict under every strategy: sharded with FSDP2 (saved through distributed
checkpoints), replicated with DDP, and exported with `magitrain.checkpoint.export --ema`.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback


class EMA(Callback):
    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            # ZeRO-3 keeps each parameter's data partitioned outside the module: a shadow copy of
            # the module would average empty tensors. FSDP2 shards the shadow like the weights.
            raise ValueError(
                "the EMA callback does not support DeepSpeed ZeRO-3; use strategy=fsdp2 "
                "or disable it with callbacks.ema=null"
            )
        if not hasattr(pl_module, "request_ema"):
            raise TypeError(f"{type(pl_module).__name__} cannot keep an EMA (it has no request_ema())")
        pl_module.request_ema()

    def decay_at(self, step: int) -> float:
        """0 (copy the weights) until `start_step`, then `decay`."""
        return 0.0 if step < self.start_step else self.decay

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts the optimiser step just taken
        if step == self._last_step:  # a gradient-accumulation micro-batch: the weights did not move
            return
        self._last_step = step
        if step % self.every_n_steps and step > self.start_step:
            return
        weight = 1.0 - self.decay_at(step)
        for shadow, param in zip(pl_module.ema.parameters(), pl_module.model.parameters(), strict=True):
            shadow.lerp_(param.detach().to(shadow.dtype), weight)
