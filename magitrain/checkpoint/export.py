"""Read a training checkpoint of any strategy and export its network in the released layout.

CKPT is a Lightning checkpoint: one file (single device, DDP), a distributed-checkpoint directory
(FSDP2) or a DeepSpeed directory. The export loads with `load_official` and the released inference
code. The command, `python -m magitrain.export`, sends a LoRA run's checkpoint to
magitrain/lora/export.py instead: checkpoint I/O serves every recipe and imports none.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from magitrain.errors import UserError
from magitrain.model import MagiHumanConfig, MagiHumanDiT

from .official import check_layout, save_official
from .resume import checkpoint_meta
from .safe_load import WeightsOnlyDCPReader, dcp_user_errors, deepspeed_tag, load_torch_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(module state dict, hyper-parameters) of a Lightning checkpoint in any strategy's format."""
    path = Path(path)
    if path.is_file():
        ckpt = load_torch_file(path, mmap=True)
        return ckpt["state_dict"], ckpt.get("hyper_parameters", {})
    if (path / "latest").is_file():  # DeepSpeed (which reads its files itself, once we checked them)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        meta = checkpoint_meta(path)
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=deepspeed_tag(path))
        return state, meta.get("hyper_parameters", {})
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint (FSDP2)
        meta = checkpoint_meta(path)  # also checks the .metadata pickle before DCP reads it
        return read_dcp_networks(path), meta.get("hyper_parameters", {})
    raise FileNotFoundError(
        f"{path} is not a Lightning checkpoint file, DeepSpeed or distributed checkpoint directory"
    )


def read_dcp_networks(path: Path, roots: tuple[str, ...] = ("model.", "ema.")) -> dict[str, torch.Tensor]:
    """The network tensors (`state_dict.model.*`, `state_dict.ema.*`) of a distributed checkpoint,
    read without a process group and without touching the optimiser state (3x the weights at 15B),
    and without unpickling anything but plain values (`WeightsOnlyDCPReader`)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    prefixes = tuple(f"state_dict.{r}" for r in roots)
    reader = WeightsOnlyDCPReader(path)
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefixes)}
    if not keys:
        raise KeyError(f"the distributed checkpoint {path} holds no network weights under {list(prefixes)}")
    with warnings.catch_warnings():  # one process reading on purpose, not a missing process group
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        with dcp_user_errors():
            loaded = _load_state_dict_from_keys(keys, storage_reader=reader)
    state = loaded["state_dict"] if "state_dict" in loaded else loaded
    return {k: v for k, v in _flatten(state).items()}


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def network_state(state: dict[str, torch.Tensor], ema: bool) -> dict[str, torch.Tensor]:
    """The released-name weights of `model` (or its EMA shadow) from a module state dict."""
    prefix = "ema." if ema else "model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        roots = sorted({k.split(".")[0] for k in state})
        what = "EMA weights (train with the EMA callback)" if ema else "model weights"
        raise KeyError(f"the checkpoint holds no {what} under '{prefix}'; its roots are {roots}")
    return weights


def export(
    ckpt: str | Path, out: str | Path, ema: bool = False, dtype: str = "keep", max_shard_size: str = "5GB"
) -> Path:
    """The network (or its EMA shadow) of a full-network training checkpoint, in the released layout."""
    state, hparams = read_training_checkpoint(ckpt)
    return export_network(state, hparams, out, str(ckpt), ema, DTYPES[dtype], max_shard_size)


def export_network(
    state: dict[str, torch.Tensor],
    hparams: dict,
    out: str | Path,
    source: str,
    ema: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    if "lora" in hparams:
        raise UserError(f"{source} is a LoRA run's checkpoint: export it with python -m magitrain.export")
    weights = network_state(state, ema)
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"{source}: {'ema' if ema else 'model'}.{name} is not finite; refusing to export it"
            )
    config = None
    if "model" in hparams:  # check the layout against the architecture the run trained
        config = MagiHumanConfig(**hparams["model"])
        with torch.device("meta"):
            network = MagiHumanDiT(config)
        check_layout(network, {k: tuple(v.shape) for k, v in weights.items()}, source)
    return save_official(
        weights, out, dtype=dtype, max_shard_size=max_shard_size, config=config,
        sampling=hparams.get("sampling"),
    )  # fmt: skip


if __name__ == "__main__":  # the command moved up, to the room that knows every recipe's export
    raise SystemExit("the export command is now: python -m magitrain.export CKPT OUT [--ema] ...")
