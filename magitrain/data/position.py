"""The resume position of the data stream: (epoch, batches of it the training loop consumed).

That pair is the whole position because the epoch plan (plan.py) is a pure function of the
config, the indexes and the epoch: on resume every worker recomputes its batches and skips the
first ones. Every rank consumes batches in lockstep (equal counts per epoch, one per step), so
rank 0's position, the one Lightning saves, is every rank's. The per-worker position follows
from the DataLoader's round robin: batch j of a rank's epoch is batch j // num_workers of worker
slot j % num_workers; see ShardDataset.part.

A saved position carries the plan's fingerprint (DataModule.plan_fingerprint): continuing it
under another plan would train some samples twice and others never.
"""

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class DataPosition:
    epoch: int = 0  # epoch of the last batch the training loop took
    consumed: int = 0  # batches of `epoch` it took on this rank

    def next_batch(self, batches_in_epoch) -> tuple[int, int]:
        """(epoch, batch) the stream continues with; `batches_in_epoch(e)` is the plan's count."""
        if self.consumed >= batches_in_epoch(self.epoch):
            return self.epoch + 1, 0
        return self.epoch, self.consumed

    def take(self, epoch: int, batch: int) -> None:
        """Count batch `batch` of `epoch` as consumed; it must be the one after the last."""
        expected = (self.epoch, self.consumed) if epoch == self.epoch else (self.epoch + 1, 0)
        if (epoch, batch) != expected:
            raise RuntimeError(
                f"batch {batch} of data epoch {epoch} arrived after batch {self.consumed - 1} of "
                f"epoch {self.epoch}: two iterators over the train loader?"
            )
        self.epoch, self.consumed = epoch, batch + 1

    def state_dict(self, plan: dict) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, **plan}

    def load_state_dict(self, state: dict, plan: dict, strict: bool = True) -> None:
        """Continue exactly where `state` stopped; if the plan changed that is impossible: raise
        naming the fields, or with `strict=False` restart the saved epoch from its first batch.
        Fields a checkpoint does not hold (written before they were fingerprinted) are not compared."""
        changed = [f"data.{k}: {state[k]} -> {v}" for k, v in plan.items() if k in state and state[k] != v]
        if changed and strict:
            raise ValueError(
                "cannot resume the data stream exactly: the checkpoint's data plan differs in "
                f"{'; '.join(changed)}. Keep them equal, or set data.strict_resume=false to "
                "restart the checkpoint's data epoch from its beginning"
            )
        self.epoch, self.consumed = max(state["epoch"], 0), state["consumed"]  # -1: saved before any batch
        if changed:
            log.warning(
                "data plan changed (%s): restarting data epoch %d from its start",
                "; ".join(changed),
                self.epoch,
            )
            self.consumed = 0
