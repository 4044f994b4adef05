"""Read torch files without running code: every load of a file is `torch.load(weights_only=True)`.

A pickle may call any function while it loads. magitrain's own checkpoints hold only tensors and
plain values (hyper-parameters as dicts, RNG states as tensors and lists, the data position as
ints), so they load with `weights_only=True`. A file that needs anything else is refused with an
error that names it; it is never unpickled with `weights_only=False`.

DeepSpeed's checkpoints hold a few DeepSpeed objects (the loss scaler, the ZeRO stage enum) and
DeepSpeed reads them itself with `weights_only=False`: `check_deepspeed_checkpoint` first reads
every file DeepSpeed will read (those of the tag that `latest` names, which must be a plain
sub-directory) with `weights_only=True` and exactly those classes allowed.

Distributed checkpoints (FSDP2) are read through `WeightsOnlyDCPReader`: its `.metadata` is
unpickled with DCP's own types allowed, and every non-tensor entry (an optimiser's `lr`, ...)
weights-only, where torch's own reader unpickles both with no restriction.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from magitrain.errors import UserError, causes


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
        raise _unsafe(str(path), err) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path} is not a readable torch file ({_first_line(err)})") from err


def _unsafe(what: str, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return UnsafeCheckpointError(
        f"{what} holds non-tensor objects{f' ({found.group(1)})' if found else ''}: magitrain reads "
        "only tensors and plain values from a checkpoint (weights_only=True) and will not unpickle it"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files hold besides tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_tag(path: str | Path) -> str:
    """The tag that `PATH/latest` names: DeepSpeed reads `PATH/<tag>/`, so it must be a plain
    sub-directory of PATH, neither a path leaving it nor a link to elsewhere."""
    latest = Path(path) / "latest"
    tag = latest.read_text().strip()
    if Path(tag).name != tag or tag in ("", ".", "..") or (Path(path) / tag).is_symlink():
        raise UnsafeCheckpointError(
            f"{latest} names the tag {tag!r}, which is not a directory inside {path}: magitrain reads "
            "DeepSpeed checkpoints only from their own sub-directories"
        )
    if not (Path(path) / tag).is_dir():
        raise CorruptCheckpointError(
            f"{latest} names the tag {tag!r}, but {Path(path) / tag} is no directory"
        )
    return tag


def check_deepspeed_checkpoint(path: str | Path) -> None:
    """Refuse a DeepSpeed checkpoint directory unless every file DeepSpeed reads loads weights-only."""
    allowed = deepspeed_safe_globals()
    for file in sorted((Path(path) / deepspeed_tag(path)).glob("*.pt")):
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


def read_dcp_metadata(path: str | Path):
    """The `.metadata` of a distributed-checkpoint directory, unpickled with only DCP's own types."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            return _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a pickle at all: junk or truncated
            raise CorruptCheckpointError(
                f"{file} is not a readable checkpoint index ({_first_line(err)})"
            ) from err
        raise _unsafe(str(file), err) from err
    except (EOFError, OSError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(
            f"{file} is not a readable checkpoint index ({_first_line(err)})"
        ) from err


def check_dcp_files(path: str | Path, metadata) -> None:
    """Every shard file `.metadata` points into exists and is long enough (a save that finished)."""
    for info in metadata.storage_data.values():
        file = Path(path) / info.relative_path
        if not file.is_file() or file.stat().st_size < info.offset + info.length:
            raise CorruptCheckpointError(
                f"{file} is missing or shorter than {Path(path) / '.metadata'} says: an unfinished save"
            )


class WeightsOnlyDCPReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader, reading nothing that can run code.

    Torch reads tensors weights-only but hands every other entry to the load planner, which
    unpickles it with `weights_only=False` (DefaultLoadPlanner.load_bytes), and `.metadata` with
    plain pickle. Here `.metadata` is read by `read_dcp_metadata` and each entry is first
    unpickled weights-only in memory: bytes that this accepts refer to nothing but its allowed
    types, so the planner's own unpickling of the same bytes can call nothing else.
    """

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_dcp_metadata(self.path)
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _PlainBytesPlanner(planner, Path(self.path)))


class _PlainBytesPlanner:
    """A load planner that checks each non-tensor entry weights-only before its planner loads it."""

    def __init__(self, planner, path: Path):
        self._planner, self._path = planner, path

    def __getattr__(self, name: str):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data, entry = value.getvalue(), read_item.dest_index.fqn
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _unsafe(f"{self._path} entry {entry}", err) from err
        except (RuntimeError, EOFError, ValueError) as err:
            raise CorruptCheckpointError(
                f"{self._path} entry {entry} is not readable ({_first_line(err)})"
            ) from err
        self._planner.load_bytes(read_item, io.BytesIO(data))


@contextlib.contextmanager
def dcp_user_errors():
    """Raise the `UserError` (a refused entry, a corrupt file) that a DCP load met on some rank
    instead of the `CheckpointException` (a BaseException) that DCP wraps every failure in."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        mine = next((e for e in causes(err) if isinstance(e, UserError)), None)
        if mine is None:
            raise
        raise mine from None
