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
        if "Weights only load failed" not in str(err):  # not a pickle at all: junk or truncated
            raise CorruptCheckpointError(f"{path} is not a readable torch file ({_first_line(err)})") from err
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


class _DCPMetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads `.metadata` with plain pickle: allow only its own types."""

    def find_class(self, module: str, name: str):
        import pathlib

        from torch.distributed.checkpoint import filesystem, metadata

        allowed = {
            ("torch", "Size"): torch.Size,
            ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
            ("pathlib", "PosixPath"): pathlib.PosixPath,
            ("pathlib", "WindowsPath"): pathlib.WindowsPath,
        }
        for cls in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata"):
            allowed["torch.distributed.checkpoint.metadata", cls] = getattr(metadata, cls)
        for cls in ("BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
            allowed["torch.distributed.checkpoint.metadata", cls] = getattr(metadata, cls)
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_dcp_metadata(path: str | Path) -> None:
    """Refuse a distributed-checkpoint directory whose `.metadata` pickle holds anything else."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a pickle at all: junk or truncated
            raise CorruptCheckpointError(
                f"{file} is not a readable checkpoint index ({_first_line(err)})"
            ) from err
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UnsafeCheckpointError(
            f"{file} holds non-tensor objects ({found.group(1) if found else err}): magitrain will "
            "not unpickle it"
        ) from err
    except (EOFError, OSError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(
            f"{file} is not a readable checkpoint index ({_first_line(err)})"
        ) from err
