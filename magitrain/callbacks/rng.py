"""Save and restore the global RNG states (Python, NumPy, torch CPU and CUDA) with checkpoints.

Stored as tensors and plain Python values so checkpoints stay loadable with `weights_only=True`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch import Callback


class RNGState(Callback):
    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
