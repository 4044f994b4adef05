"""The released checkpoint layout: sharded safetensors + `model.safetensors.index.json`.

`load_official` is strict: every tensor of the model must be in the checkpoint with the same
shape and nothing else may be there. The released loader is non-strict and only prints
mismatches, which silently trains a half-initialised model; ours fails loudly instead.

`save_official` writes the release's per-tensor dtypes (block linears in the export dtype, norms,
embedders, heads and the RoPE buffer in float32) and, as diffusers and the release's folders do, a
`config.json` with the architecture (`MagiHumanConfig` fields) that `read_config` reads back, and
the sampler the network was trained for (`"sampling": {"sampler": ..., "steps": ...}`, a DMD-2
student's `distilled` 8 steps; an SR student's with `"stage": "sr"`) that `read_sampling` reads
back for infer.py's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_CLASS = "MagiHumanDiT"  # `_class_name` of our config.json, as diffusers marks its configs
# The tensors the release stores in its low precision: the block linears. Everything else (norms,
# embedders, output heads, the RoPE frequencies) is float32 in every released folder.
BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.linear_(qkv|proj)|mlp\.(up_gate|down)_proj)\.weight"
)
TRAINING_ONLY = ("activation_checkpointing", "attn_backend")  # run settings, not architecture
SAMPLING = "sampling"  # config.json's key of the sampler and steps a network was trained for
_SHOW = 5  # keys listed per kind of mismatch
log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose tensor names or shapes differ from the model's."""


def _shard_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FileNotFoundError(f"{path} is not a .safetensors file or a checkpoint directory")
        files = [path]
    elif (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        if "weight_map" not in index:
            raise CheckpointMismatchError(f"{path / INDEX_NAME} has no 'weight_map'")
        for name, f in index["weight_map"].items():
            # lexical, not resolve(): a hub snapshot's shards are links into its blob store
            if Path(f).is_absolute() or ".." in Path(f).parts:
                raise CheckpointMismatchError(
                    f"{path / INDEX_NAME}: weight_map[{name!r}] = {f!r} points outside {path}"
                )
        missing = sorted({f for f in index["weight_map"].values() if not (path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{path / INDEX_NAME} names shard files that are absent: {missing}")
        return {name: path / f for name, f in index["weight_map"].items()}
    elif (path / SINGLE_NAME).is_file():
        files = [path / SINGLE_NAME]
    elif path.is_dir():
        raise FileNotFoundError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
    else:
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            names.update({k: f for k in st.keys()})
    return names


def block_linear_dtype(path: str | Path) -> torch.dtype:
    """The dtype a released-layout checkpoint stores its block linears in (bf16 in the release)."""
    where = _shard_files(Path(path))
    name = next((k for k in where if BLOCK_LINEAR.fullmatch(k)), None)
    if name is None:
        raise CheckpointMismatchError(f"{path} holds no block linear weights")
    with safe_open(where[name], framework="pt") as st:
        return st.get_slice(name)[:1].dtype  # one row, not the whole weight


def _describe(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {kind}: {shown}"


def check_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointMismatchError naming missing, unexpected and wrongly shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{k} (checkpoint {list(shapes[k])}, model {list(expected[k])})"
        for k in set(expected) & set(shapes)
        if tuple(shapes[k]) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [
            _describe(kind, keys)
            for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong))
            if keys
        ]
        raise CheckpointMismatchError(f"checkpoint {source} does not match the model: " + "; ".join(parts))


@torch.no_grad()
def load_official(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a released-layout checkpoint (directory or one .safetensors file) into `model`, strictly.

    Tensors are converted to the dtype of the model's own parameters and buffers, one shard at a
    time, so peak memory stays one shard above the model. A model on the meta device is
    materialised on the CPU.
    """
    path = Path(path)
    where = _shard_files(path)
    shapes = {}
    for f in sorted(set(where.values())):
        with safe_open(f, framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys() if where.get(k) == f})
    check_layout(model, shapes, str(path))

    targets = model.state_dict(keep_vars=True)
    on_meta = any(t.is_meta for t in targets.values())
    loaded = {}
    for f in sorted(set(where.values())):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                if where.get(k) != f:
                    continue
                tensor = st.get_tensor(k).to(targets[k].dtype)
                if on_meta:
                    loaded[k] = tensor
                else:
                    targets[k].copy_(tensor)
    if on_meta:
        model.load_state_dict(loaded, strict=True, assign=True)
    parameters = sum(math.prod(shape) for shape in shapes.values())
    log.info("loaded %d tensors (%.4gM parameters, strict) from %s", len(shapes), parameters / 1e6, path)
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def release_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the release stores tensor `name` in when exporting the block linears in `dtype`."""
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return dtype if BLOCK_LINEAR.fullmatch(name) else torch.float32


def write_config(config, path: str | Path, sampling: dict | None = None) -> Path:
    """`config.json`: the MagiHumanConfig fields that define the architecture, and `sampling` (the
    sampler and steps the network was trained for) when known."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in TRAINING_ONLY}
    if sampling:
        fields[SAMPLING] = {"sampler": sampling["sampler"], "steps": int(sampling["steps"])}
        if sampling.get("stage", "base") != "base":  # an SR stage's sampler (recipe=sr_dmd2_*)
            fields[SAMPLING]["stage"] = sampling["stage"]
    out = Path(path) / CONFIG_NAME
    out.write_text(json.dumps({"_class_name": CONFIG_CLASS, **fields}, indent=2, sort_keys=True))
    return out


def _config_file(path: str | Path) -> Path:
    """The `config.json` of a checkpoint directory, or the one beside a weight file."""
    path = Path(path)
    return path / CONFIG_NAME if path.is_dir() else path.parent / CONFIG_NAME


def _our_config(path: str | Path) -> dict | None:
    """The fields of a checkpoint's `config.json` when it is one of ours, else None."""
    file = _config_file(path)
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if data.pop("_class_name", None) != CONFIG_CLASS:
        return None  # some other tool's config (not a MagiHumanDiT architecture)
    return data


def read_sampling(path: str | Path) -> dict | None:
    """`{"sampler", "steps"}` the network of `path` was trained for (its config.json), else None."""
    data = _our_config(path)
    return data.get(SAMPLING) if data else None


def read_config(path: str | Path):
    """The MagiHumanConfig of a checkpoint directory's `config.json`, or None when it has none."""
    from magitrain.model import MagiHumanConfig

    data = _our_config(path)
    if data is None:
        return None
    data.pop(SAMPLING, None)
    known = {f.name for f in dataclasses.fields(MagiHumanConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{_config_file(path)} has fields MagiHumanConfig does not know: {unknown}")
    return MagiHumanConfig(**data)


def _user_mode(path: Path) -> None:
    """safetensors creates files 0600; give them the permissions the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_official(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    config=None,
    sampling: dict | None = None,
) -> Path:
    """Write the released layout: `model-0000i-of-0000n.safetensors` shards, the index json and,
    with the architecture known (`config`, or the model's own), `config.json` (with `sampling`, the
    sampler and steps the network was trained for, when given).

    `dtype` is the storage dtype of the block linears; the other floating tensors are written in
    float32, as released (None keeps every tensor's dtype). Returns the directory.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    config = config if config is not None else getattr(model, "config", None)
    limit = _parse_size(max_shard_size)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        t = t.to(release_dtype(name, t, dtype))
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes

    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        _user_mode(path / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    if config is not None:
        write_config(config, path, sampling)
    return path
