"""Checkpoints that are either complete or absent, and read without running code.

Writes go to a temporary name, then are renamed: a process killed mid-write leaves the previous
checkpoint intact (and a stray `.tmp` file or `.partial` directory), never a truncated checkpoint
under a name that `ckpt_path=last` resumes from. A directory checkpoint (FSDP2, DeepSpeed) is
renamed once every rank has written its part. A full disk stops the run with a short error naming
the folder and its free space, and leaves no partial file. Reads are weights-only
(`magitrain.checkpoint.safe_load`), whatever `weights_only` Lightning passes.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from magitrain.errors import UserError, causes

from .safe_load import load_torch_file

PARTIAL = ".partial"  # a directory checkpoint being written; `*.ckpt` globs never match it


class DiskFullError(UserError):
    """The checkpoint folder's file system ran out of space (or quota) while writing."""


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
        except (OSError, RuntimeError) as err:
            raise_if_disk_full(err, path)
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_torch_file(path)


def raise_if_disk_full(err: BaseException, path: Path) -> None:
    """Replace a write error caused by a full disk by a `DiskFullError` saying where and how much is
    left (torch.save reports it as `unexpected pos` with the OSError in its context; DCP among the
    failures of its ranks)."""
    if not any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in causes(err)):
        return
    free = shutil.disk_usage(path.parent).free
    raise DiskFullError(
        f"no space left to write checkpoint {path.name} in {path.parent} ({free / 2**20:.1f} MiB free); "
        "the checkpoints written before it are intact: free space and resume with ckpt_path=last"
    ) from None


def write_directory_atomically(strategy, path: Path, write: Callable[[Path], None]) -> None:
    """Every rank writes its part of the checkpoint `path` through `write(PATH.partial)`; once all
    have, rank 0 renames it to `path` (replacing a checkpoint of the same name)."""
    partial = path.with_name(path.name + PARTIAL)
    if strategy.is_global_zero and partial.exists():
        shutil.rmtree(partial)  # what a killed save left
    strategy.barrier()
    try:
        write(partial)
    except BaseException as err:  # DCP's CheckpointException, holding each rank's error, is one
        if strategy.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        raise_if_disk_full(err, path)
        raise
    strategy.barrier()  # every rank's shards are on disk
    if strategy.is_global_zero:
        old = path.with_name(path.name + ".old")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
