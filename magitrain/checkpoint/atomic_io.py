"""Checkpoint files that are either complete or absent, and read without running code.

Writes go to a temporary name, then are renamed: a process killed mid-write leaves the previous
checkpoint intact (and a stray `.tmp` file), never a truncated checkpoint under a name that
`ckpt_path=last` resumes from. Reads are weights-only (`magitrain.checkpoint.safe_load`), whatever
`weights_only` Lightning passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .safe_load import load_torch_file


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_torch_file(path)
