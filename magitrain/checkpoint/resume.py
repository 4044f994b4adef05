"""Which checkpoint a run resumes from: `ckpt_path=last` is the newest step the run saved.

A run's checkpoints are the `*.ckpt` files and directories (FSDP2, DeepSpeed) in its checkpoint
folder, whichever callback wrote them, plus Lightning's SLURM preemption checkpoints
(`<run dir>/hpc_ckpt_N.ckpt`). "Newest" is the largest global step stored in them, not a file
name or a modification time, so a run directory that was moved or copied resumes where it stopped.
Reading a step reads the checkpoint's pickle weights-only (tensors are memory-mapped, not read).
A checkpoint that cannot be read is stepped over, with a warning, to the newest one that can.
"""

from __future__ import annotations

import logging
from pathlib import Path

from magitrain.errors import UserError

from .safe_load import (
    CorruptCheckpointError,
    check_dcp_files,
    check_deepspeed_checkpoint,
    deepspeed_safe_globals,
    deepspeed_tag,
    load_torch_file,
    read_dcp_metadata,
)

log = logging.getLogger("magitrain")


def checkpoint_meta(path: str | Path) -> dict:
    """The checkpoint's non-tensor entries (global_step, hyper_parameters, ...), read weights-only.

    Reading it checks that Lightning may load the checkpoint: a file holding anything but tensors
    and plain values raises `UnsafeCheckpointError`, naming it.
    """
    path = Path(path)
    if path.is_file():
        meta = load_torch_file(path, mmap=True)
    elif (path / "meta.pt").is_file() and (path / ".metadata").is_file():  # torch.distributed.checkpoint
        check_dcp_files(path, read_dcp_metadata(path))
        meta = load_torch_file(path / "meta.pt")
    elif (path / "latest").is_file():  # DeepSpeed
        check_deepspeed_checkpoint(path)
        tag = deepspeed_tag(path)
        states = sorted((path / tag).glob("mp_rank_*_model_states.pt"))
        if not states:
            raise CorruptCheckpointError(
                f"{path} is a DeepSpeed checkpoint without {tag}/mp_rank_*_model_states.pt"
            )
        meta = load_torch_file(states[0], mmap=True, safe_globals=deepspeed_safe_globals())
    elif path.exists():
        raise CorruptCheckpointError(
            f"{path} is neither a checkpoint file, an FSDP2 (.metadata, meta.pt) nor a DeepSpeed (latest) "
            "checkpoint directory: an unfinished save?"
        )
    else:
        raise UserError(f"checkpoint {path} does not exist")
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise CorruptCheckpointError(f"{path} is a torch file, not a Lightning checkpoint (no global_step)")
    return meta


def run_checkpoints(ckpt_dir: str | Path, run_dir: str | Path | None = None) -> list[Path]:
    """Every checkpoint of a run (links resolved, each once), in no particular order."""
    found = {}
    candidates = list(Path(ckpt_dir).glob("*.ckpt")) if Path(ckpt_dir).is_dir() else []
    if run_dir is not None:
        candidates += Path(run_dir).glob("hpc_ckpt_*.ckpt")
    for path in candidates:
        if path.exists():  # a dangling link is no checkpoint
            found.setdefault(path.resolve(), path)
    return list(found.values())


def newest_checkpoint(ckpt_dir: str | Path, run_dir: str | Path | None = None) -> Path | None:
    """The run's readable checkpoint with the largest global step (None if it has none).

    One that cannot be read (a save killed midway, a truncated file) is stepped over with a
    warning naming it: a requeued job resumes from the newest complete step instead of failing.
    One that holds objects (`UnsafeCheckpointError`) is refused, not stepped over.
    """
    steps: list[tuple[int, Path]] = []
    for path in run_checkpoints(ckpt_dir, run_dir):
        try:
            steps.append((int(checkpoint_meta(path)["global_step"]), path))
        except CorruptCheckpointError as err:
            log.warning("ckpt_path=last: skipping %s: %s", path, err)
    steps.sort(key=lambda sp: (sp[0], sp[1].parent == Path(ckpt_dir)))
    return steps[-1][1] if steps else None
