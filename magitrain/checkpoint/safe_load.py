"""Read torch files without running code: every load of a file is `torch.load(weights_only=True)`.

A pickle may call any function while it loads. magitrain's own checkpoints hold only tensors and
plain values (hyper-parameters as dicts, RNG states as tensors and lists, the data position as
ints), so they load with `weights_only=True`. A file that needs anything else is refused with an
error that names it; it is never unpickled with `weights_only=False`.

DeepSpeed's checkpoints hold a few DeepSpeed objects (the loss scaler, the ZeRO stage enum) and
DeepSpeed reads them itself with `weights_only=False`: `check_deepspeed_checkpoint` first reads
every file of such a directory with `weights_only=True` and exactly those classes allowed.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from magitrain.errors import UserError


class UnsafeCheckpointError(UserError):
    """A torch file that holds objects other than tensors and plain values."""


class CorruptCheckpointError(UserError):
    """A torch file that cannot be read at all (truncated, not a torch file)."""


def load_torch_file(path: str | Path, mmap: bool = False, safe_globals: list | None = None) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; errors name the file and say what is wrong."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} holds non-tensor objects{what}: magitrain reads only tensors and plain values "
            "from a checkpoint (weights_only=True) and will not unpickle it"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path} is not a readable torch file ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files hold besides tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_checkpoint(path: str | Path) -> None:
    """Refuse a DeepSpeed checkpoint directory unless every file in it loads weights-only."""
    allowed = deepspeed_safe_globals()
    for file in sorted(Path(path).rglob("*.pt")):
        load_torch_file(file, mmap=True, safe_globals=allowed)
