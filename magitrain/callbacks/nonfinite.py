"""Non-finite steps never reach the weights: skip them, count them, stop a run that diverged.

Before every optimiser step the guard computes the total gradient norm (logged as
`train/grad_norm`, before clipping) and checks it and the step's loss (every micro-batch of it).
If either is not finite on any rank, every rank drops its gradients, so the optimiser changes
neither the weights nor its own state, and `pl_module.skipped_optimizer_step` tells the EMA to
leave its shadow alone. The step still counts (the global step and the lr schedule advance).
Skipped steps are logged as `train/skipped_steps`. After `max_consecutive` bad steps in a row
the run stops with `TrainingDiverged`, naming the steps and the newest checkpoint.

A checkpoint is only written when every tensor of the module state is finite: the guard refuses
any other (and names the first bad tensor).

Recipes with manual optimisation (DMD-2) guard their own optimisers; this callback then only
refuses non-finite checkpoints. Under DeepSpeed the gradients live inside the engine: the guard
sees the loss only and cannot skip the step DeepSpeed takes, so it only stops the run.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback

from magitrain.errors import UserError

log = logging.getLogger("magitrain")


class TrainingDiverged(UserError):
    """Too many optimiser steps in a row had a non-finite loss or gradient norm."""


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint was about to be written with non-finite weights."""


class NonFiniteGuard(Callback):
    def __init__(self, max_consecutive: int = 3):
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run (kept in checkpoints)
        self.consecutive = 0
        self._first_bad_step = 0
        self._loss_finite: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not pl_module.automatic_optimization:
            return
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not pl_module.automatic_optimization:
            # Manual optimisation (DMD-2) clips, checks and skips each of its optimisers itself;
            # logging from this hook there also made Lightning drop the step's earlier metrics.
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ok = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            ok = ok & torch.isfinite(norm)
        bad = trainer.strategy.reduce_boolean_decision(not bool(ok), all=False)  # every rank skips alike
        pl_module.skipped_optimizer_step = bad
        if bad:
            self._skip(trainer, optimizer)
        else:
            self.consecutive = 0
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _skip(self, trainer, optimizer) -> None:
        step = trainer.global_step + 1  # the step being taken, as checkpoints and logs number it
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self._first_bad_step = step
        log.warning(
            "step %d: non-finite loss or gradient norm, optimiser step skipped (%d in a row, %d in all)",
            step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: steps {self._first_bad_step}-{step} all had a non-finite loss or "
                f"gradient norm (callbacks.nonfinite.max_consecutive={self.max_consecutive}); the weights "
                f"were not updated by them. Last good checkpoint: {_newest_checkpoint(trainer)}. Resume "
                "from it with ckpt_path=... and a lower module.optim.lr, or check the data."
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = next((k for k, v in checkpoint.get("state_dict", {}).items() if not _finite(v)), None)
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            raise NonFiniteCheckpointError(
                f"refusing to write a checkpoint at step {trainer.global_step}: "
                f"{bad or 'a tensor on another rank'} is not finite"
            )

    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "first_bad_step": self._first_bad_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]
        self._first_bad_step = state_dict["first_bad_step"]


def _finite(value) -> bool:
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return True
    local = value.to_local() if hasattr(value, "to_local") else value  # FSDP2: this rank's shard
    return bool(torch.isfinite(local).all())


def _newest_checkpoint(trainer) -> str:
    from magitrain.checkpoint.resume import newest_checkpoint

    callback = trainer.checkpoint_callback
    try:
        newest = newest_checkpoint(callback.dirpath, trainer.default_root_dir) if callback else None
    except UserError as err:
        return f"none readable ({err})"
    return str(newest) if newest else "none yet"
