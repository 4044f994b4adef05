"""The resume position of the data stream: (epoch, batches of it the training loop consumed).

That pair is the whole position because the epoch plan (plan.py) is a pure function of the
config, the indexes and the epoch: on resume every worker recomputes its batches and skips the
first ones. Every rank consumes batches in lockstep (equal counts per epoch, one per step), so
rank 0's position, the one Lightning saves, is every rank's. The per-worker position follows
from the DataLoader's round robin: after k batches, worker slot w (0-based within the rank) has
yielded ceil((k - w) / num_workers) of its batches; see ShardDataset.__iter__.
"""

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PLAN_FIELDS = ("seed", "world_size", "num_workers")


@dataclass
class DataPosition:
    epoch: int = -1  # epoch being iterated; -1 before the first iter()
    consumed: int = 0  # batches of `epoch` the training loop has taken on this rank
    restored: bool = False  # set by load_state_dict: the next iter() continues instead of advancing

    def begin_epoch(self, batches_in_epoch) -> tuple[int, int]:
        """(epoch, first batch) for the iter() that is starting; `batches_in_epoch(e)` is the plan's
        count, used when a checkpoint was taken right at the end of an epoch."""
        if self.restored and self.epoch >= 0:
            self.restored = False
            if self.consumed < batches_in_epoch(self.epoch):
                return self.epoch, self.consumed
        self.restored = False
        self.epoch, self.consumed = self.epoch + 1, 0
        return self.epoch, 0

    def state_dict(self, plan: dict) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, **plan}

    def load_state_dict(self, state: dict, plan: dict, strict: bool = True) -> None:
        """Continue exactly where `state` stopped; if the plan changed (other seed, world size or
        workers) that is impossible: raise, or with `strict=False` restart the saved epoch."""
        changed = [f"data.{k}: {state[k]} -> {plan[k]}" for k in PLAN_FIELDS if state.get(k) != plan[k]]
        if changed and strict:
            raise ValueError(
                "cannot resume the data stream exactly: the checkpoint's data plan used a "
                f"different {', '.join(changed)}; keep them equal, or set data.strict_resume=false "
                "to restart the checkpoint's data epoch from its beginning"
            )
        if changed:
            log.warning(
                "data plan changed (%s): restarting data epoch %d from its start",
                ", ".join(changed),
                state["epoch"],
            )
            self.epoch, self.consumed, self.restored = state["epoch"] - 1, 0, False
            return
        self.epoch, self.consumed, self.restored = state["epoch"], state["consumed"], True
