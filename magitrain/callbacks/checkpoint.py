"""When a run writes checkpoints: every N steps, at the end of training, and when it is told to stop.

`RunCheckpoint` is Lightning's `ModelCheckpoint` plus three rules:
- The final step is always saved (max_steps=4 with every_n_train_steps=3 saves steps 3 and 4).
- SIGTERM, and SIGUSR1 where Lightning does not own it (outside SLURM auto-requeue), make the run
  save a checkpoint at the step reached and stop; `train.py` then exits with 143.
- Under SLURM auto-requeue, Lightning's own SIGUSR1 handler (save `hpc_ckpt_N.ckpt`, requeue the
  job) is kept but deferred to the end of the optimiser step in flight.

A signal handler only sets a flag; the checkpoint is written in `on_train_batch_end` after an
optimiser step, the same point every periodic checkpoint is taken at (this callback runs after EMA
and every other callback), so the weights, optimiser, EMA, RNG and data position all belong to the
same step and the checkpoint resumes bit-exactly. Saving from inside the handler, as Lightning's
SLURM handler does on its own, catches the loop between fetching a batch and stepping on it: the
data position is then one batch ahead of the weights. The flag is reduced over all ranks at every
step, so every rank saves the same step even when only one of them was signalled.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("magitrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE_SIGNALLED = 128 + signal.SIGTERM  # 143: "terminated", what schedulers and shells expect


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, **kwargs):
        kwargs.setdefault("enable_version_counter", False)  # never step00000025-v1.ckpt or last-v1.ckpt
        super().__init__(**kwargs)
        self._received: dict[int, bool] = {}
        self._lightning_handlers: dict[int, object] = {}
        self._previous_handlers: dict[int, object] = {}
        self._step_seen = -1
        self.stopped_by: int | None = None  # the signal that stopped the run, if one did

    # ----- signals ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen = trainer.global_step
        self._received = {}
        # Lightning registers its handlers just before the loop starts: replace them by flag setters.
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            if signum == signal.SIGUSR1 and _lightning_requeues(trainer):
                self._lightning_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_now(trainer)  # the final step, whatever ended training (max_steps, epochs, time)
        super().on_train_end(trainer, pl_module)
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        self._received[signum] = True  # only a flag: the loop may be anywhere between two steps

    def _signals_on_any_rank(self, trainer) -> list[int]:
        here, self._received = self._received, {}  # a signal arriving from now on counts next step
        flags = torch.tensor(
            [float(here.get(s, False)) for s in STOP_SIGNALS], device=trainer.strategy.root_device
        )
        flags = trainer.strategy.reduce(flags, reduce_op="max") if trainer.world_size > 1 else flags
        return [s for s, flag in zip(STOP_SIGNALS, flags.tolist(), strict=True) if flag]

    # ----- saving -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_seen:
            return  # a gradient-accumulation micro-batch: the step is not complete, nothing to save yet
        self._step_seen = trainer.global_step
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_now(trainer)
        received = self._signals_on_any_rank(trainer)
        if signal.SIGUSR1 in received and signal.SIGUSR1 in self._lightning_handlers:
            received.remove(signal.SIGUSR1)
            log.info("SIGUSR1 under SLURM: Lightning saves hpc_ckpt (step %d), requeues", trainer.global_step)
            self._lightning_handlers[signal.SIGUSR1](signal.SIGUSR1, None)
        if received:
            self._save_now(trainer)
            self.stopped_by = received[0]
            trainer.should_stop = True
            log.warning(
                "%s: saved step %d to %s; stopping (exit code %d)",
                signal.Signals(received[0]).name,
                trainer.global_step,
                self._last_checkpoint_saved,
                EXIT_CODE_SIGNALLED,
            )

    def _save_now(self, trainer) -> None:
        """Save this step as a periodic checkpoint would (named by its step, `last` linked to it)."""
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """`last` -> the newest checkpoint, replaced atomically (a kill never leaves it missing)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = Path(linkpath).with_name(Path(linkpath).name + ".tmp")
            tmp.unlink(missing_ok=True)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):  # a full copy from save_last=true
                shutil.rmtree(linkpath)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier()


def _lightning_requeues(trainer) -> bool:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue
