"""Exponential moving average of the trained network in float32.

The shadow weights live in the LightningModule as a frozen copy of the network (`module.ema`),
built in `configure_model` and sharded by the same plan as the network. That way they are part
of the model state dict under every strategy: sharded with FSDP2 (saved through distributed
checkpoints), replicated with DDP, and exported with `python -m magitrain.export --ema`.

The shadow is float32 under every strategy. DeepSpeed's bf16 mode casts every parameter of the
module, the shadow included, to bf16, where `lerp_` with a weight of 1e-4 rounds away: the
callback casts the shadow back once the engine is built (`on_fit_start`). A shadow restored from
a DeepSpeed checkpoint passed through the bf16 module once on loading (one rounding per resume).

Arithmetic, per optimiser step `step` (counted after the step, as `trainer.global_step`):
`shadow <- shadow + (1 - d) (param - shadow)` with `d = 0` before `start_step` (a copy) and
`d = decay` from then on, every `every_n_steps`-th step; gradient-accumulation micro-batches that
take no optimiser step update nothing.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (shadow and network are sharded alike), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def ema_pairs(pl_module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(shadow, live) parameters: the module's own choice when it has one (LoRA: the adapters
    only, `ema_parameters()`), else every parameter of `ema` and `model`."""
    if hasattr(pl_module, "ema_parameters"):
        return pl_module.ema_parameters()
    return list(pl_module.ema.parameters()), list(pl_module.model.parameters())


class EMA(Callback):
    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"callbacks.ema.every_n_steps must be >= 1, got {every_n_steps}")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self._last_step: int | None = None

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

    def on_fit_start(self, trainer, pl_module) -> None:
        for shadow in ema_pairs(pl_module)[0]:
            if shadow.dtype != torch.float32:  # DeepSpeed bf16 cast the whole module
                shadow.data = shadow.data.float()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run counts on from its step

    def decay_at(self, step: int) -> float:
        """0 (copy the weights) until `start_step`, then `decay`."""
        return 0.0 if step < self.start_step else self.decay

    def due(self, step: int) -> bool:
        """Whether optimiser step `step` updates the shadow."""
        return step <= self.start_step or step % self.every_n_steps == 0

    @torch.no_grad()
    def update(self, pl_module, step: int) -> None:
        """One batched float32 update of every shadow tensor towards the network's weights."""
        shadow_params, live = ema_pairs(pl_module)
        shadows = [_local(s) for s in shadow_params]
        params = [_local(p.detach()).float() for p in live]
        if len(shadows) != len(params):
            raise RuntimeError(f"EMA shadow has {len(shadows)} tensors, the network {len(params)}")
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay_at(step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts the optimiser step just taken
        if step == self._last_step:  # a gradient-accumulation micro-batch: the weights did not move
            return
        self._last_step = step
        if getattr(pl_module, "skipped_optimizer_step", False):  # NonFiniteGuard dropped this step
            return
        if self.due(step):
            self.update(pl_module, step)
