"""A test callback (no test imports, so `train.py` subprocesses can load it as `tests.nonfinite_probe`):
makes one step of one rank non-finite and records what every step changed.

mode "latent": an inf in one latent sample of that rank's batch (the loss and, through the
gradient all-reduce, every rank's gradients become non-finite).
mode "loss": only that rank's loss value becomes NaN, its gradients stay finite: unless the skip
decision is reduced over the ranks, that rank alone would skip and the replicas would drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if hasattr(t, "to_local") else t
    if type(t) is not torch.Tensor:  # torchao's 8-bit optimiser states (module.optim.states=8bit)
        t = t.dequantize()
    return t.detach().clone()


class InjectInf(Callback):
    def __init__(self, step: int, out: str, rank: int = 0, mode: str = "latent"):
        self.step, self.rank, self.out, self.mode = step, rank, Path(out), mode
        self.record: dict = {}

    def _here(self, trainer) -> bool:
        return trainer.global_step == self.step and trainer.global_rank == self.rank

    def on_train_start(self, trainer, pl_module) -> None:
        training_step = pl_module.training_step

        def nan_loss_value(batch, batch_idx):
            loss = training_step(batch, batch_idx)
            if self.mode == "loss" and self._here(trainer):
                loss = loss + loss.detach() * float("nan")  # NaN value, the same finite gradients
            return loss

        pl_module.training_step = nan_loss_value

    def _state(self, pl_module, optimizer) -> dict[str, torch.Tensor]:
        state = {f"module.{k}": _local(v) for k, v in pl_module.state_dict().items()}
        for i, s in enumerate(optimizer.state.values()):
            state.update({f"optim.{i}.{k}": _local(v) for k, v in s.items() if isinstance(v, torch.Tensor)})
        return state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._state(pl_module, trainer.optimizers[0])
        if self.mode == "latent" and self._here(trainer):
            batch["video_latent"][0].view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._state(pl_module, trainer.optimizers[0])
        changed = sorted(
            k for k in after if k not in self._before or not torch.equal(after[k], self._before[k])
        )
        self.record[trainer.global_step] = {"changed": changed, "loss": float(outputs["loss"])}

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}.json"
        guard = next(cb for cb in trainer.callbacks if type(cb).__name__ == "NonFiniteGuard")
        path.write_text(json.dumps({"steps": self.record, "skipped": guard.skipped}))
