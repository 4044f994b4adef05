"""Save and restore every rank's global RNG states (Python, NumPy, torch CPU and CUDA) with checkpoints.

A checkpoint's callback states are written by rank 0 alone, so each rank's states are gathered
into it (all ranks save together) and each rank restores its own: rank r's dropout masks, and its
CUDA generator (which rank 0's process never advanced), continue where rank r left off.
Stored as tensors and plain Python values so checkpoints stay loadable with `weights_only=True`.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_state() -> dict:
    """This process's RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_local_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    def state_dict(self) -> dict:
        """{"ranks": [the states of rank 0, rank 1, ...]}: a collective, called on every rank."""
        if not _distributed():
            return {"ranks": [local_state()]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, local_state())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        if "ranks" not in state_dict:  # a checkpoint of before per-rank states: rank 0's, for all
            restore_local_state(state_dict)
            return
        rank, saved = (dist.get_rank() if _distributed() else 0), state_dict["ranks"]
        if rank < len(saved):
            restore_local_state(saved[rank])
        else:  # more ranks than the checkpoint had: nothing of this rank to continue
            log.warning(
                "the checkpoint has RNG states of %d ranks: rank %d keeps its seeded RNG", len(saved), rank
            )
