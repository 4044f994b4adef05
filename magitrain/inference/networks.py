"""Networks for inference from any checkpoint magitrain reads or writes, and their inference dtypes.

`ckpt` may be
- a released-layout directory (sharded safetensors + index, or `model.safetensors`), which is also
  what `python -m magitrain.export` writes, or a single `.safetensors` file: the
  architecture comes from the `config.json` beside the weights (exports write one), else from the
  `model` preset;
- a Lightning training checkpoint (a `.ckpt` file, an FSDP2 distributed-checkpoint directory or a
  DeepSpeed directory): the architecture comes from its hyper-parameters, and `weights` picks the
  EMA shadow or the raw trained network.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from magitrain.checkpoint import CheckpointMismatchError, check_layout, load_official
from magitrain.checkpoint.export import network_state, read_training_checkpoint
from magitrain.checkpoint.official import read_config, read_sampling
from magitrain.checkpoint.resume import checkpoint_meta
from magitrain.checkpoint.safe_load import CorruptCheckpointError
from magitrain.model import MagiHumanConfig, MagiHumanDiT, get_config
from magitrain.model.layers import ModalityLinear

log = logging.getLogger("magitrain")

WEIGHTS = ("auto", "ema", "raw")  # auto: the EMA weights when the training checkpoint has them


def is_training_checkpoint(path: Path) -> bool:
    """Lightning's formats: a torch-saved file, or a DeepSpeed / distributed-checkpoint directory."""
    if path.is_dir():
        return (path / "latest").is_file() or (path / ".metadata").is_file()
    return path.suffix != ".safetensors"


def load_network(
    ckpt: str | Path,
    model: str | MagiHumanConfig | None = None,
    weights: str = "auto",
    field: str = "ckpt",
    dtype: torch.dtype = torch.float32,
    fallback: str = "magihuman_15b",
) -> MagiHumanDiT:
    """A MagiHumanDiT on the CPU with the weights of `ckpt`; errors name `field` and the file.

    The architecture of a released-layout folder is `model` when given, else its `config.json`,
    else the `fallback` preset (released folders carry no config.json of ours). The block linears
    are loaded straight into `dtype` (see `to_inference_dtype`), so a 15B model in bf16 never
    needs its 61 GB float32 copy in host memory.
    """
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field}={ckpt}: no such file or directory")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    config = get_config(model) if isinstance(model, str) else model
    if is_training_checkpoint(path):
        config = config or get_config(fallback)
        return _from_training_checkpoint(path, config, weights, field, dtype)
    if weights == "ema":
        raise ValueError(f"{field}={ckpt} is a released-layout checkpoint: it has no separate EMA weights")
    if config is None:
        try:
            config = read_config(path) or get_config(fallback)
        except ValueError as err:
            raise ValueError(f"{field}: {err}") from err
    network = _meta_network(config, dtype)
    try:
        return load_official(network, path)
    except (FileNotFoundError, CheckpointMismatchError) as err:
        raise type(err)(f"{field}: {err}") from err


def recorded_sampling(ckpt: str | Path, stage: str = "base") -> dict | None:
    """`{"sampler", "steps"}` the network of `ckpt` was trained for as the `stage` (base | sr) (an
    export's config.json, a training checkpoint's hyper-parameters); None for released folders, SR
    fine-tuned networks, and a network recorded for the other stage."""
    path = Path(ckpt).expanduser()
    if is_training_checkpoint(path):
        recorded = checkpoint_meta(path).get("hyper_parameters", {}).get("sampling")
    else:
        recorded = read_sampling(path)
    return recorded if recorded and recorded.get("stage", "base") == stage else None


def _meta_network(config: MagiHumanConfig, dtype: torch.dtype) -> MagiHumanDiT:
    with torch.device("meta"):
        network = MagiHumanDiT(config.replace(activation_checkpointing=False))
    return to_inference_dtype(network, dtype)


def _from_training_checkpoint(
    path: Path, config: MagiHumanConfig, weights: str, field: str, dtype: torch.dtype
) -> MagiHumanDiT:
    try:
        state, hparams = read_training_checkpoint(path)
    except (CorruptCheckpointError, pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{field}={path} is neither a released-layout checkpoint nor a readable Lightning "
            f"checkpoint: {err}"
        ) from err
    except KeyError as err:
        raise ValueError(f"{field}={path} is a torch file without {err}: not a Lightning checkpoint") from err
    if hparams.get("lora"):
        raise ValueError(
            f"{field}={path} is a LoRA training checkpoint: it holds adapters, not a network. Export the "
            f"adapter (python -m magitrain.export {path} adapter.safetensors) and pass the base "
            f"as {field}= and the adapter as lora= (sr_lora= for the SR network), or export with --merge"
        )
    if "model" in hparams:  # the architecture the run trained, whatever preset was asked for
        config = MagiHumanConfig(**hparams["model"])
    use_ema = weights == "ema" or (weights == "auto" and any(k.startswith("ema.") for k in state))
    try:
        named = network_state(state, ema=use_ema)
    except KeyError as err:
        raise KeyError(f"{field}={path}: {err.args[0]}") from err
    network = _meta_network(config, dtype)
    check_layout(network, {k: tuple(v.shape) for k, v in named.items()}, f"{field}={path}")
    targets = network.state_dict()
    network.load_state_dict({k: v.to(targets[k].dtype) for k, v in named.items()}, strict=True, assign=True)
    log.info("%s=%s: loaded the %s weights", field, path, "EMA" if use_ema else "raw")
    return network


def to_inference_dtype(network: MagiHumanDiT, dtype: torch.dtype) -> MagiHumanDiT:
    """Store the block linears in `dtype` (bf16: as released); norms, embedders and heads stay float32.

    Under bf16 autocast the linears compute in bf16 anyway, so this changes no number and halves
    the weight memory (a 15B base and SR model then fit one 80 GB GPU together).
    """
    for module in network.block.modules():
        if isinstance(module, ModalityLinear):
            module.to(dtype)
    return network


def random_network(config: MagiHumanConfig, device: torch.device | str, dtype: torch.dtype) -> MagiHumanDiT:
    """Randomly initialised weights, materialised directly on `device` (no 61 GB float32 detour)."""
    network = _meta_network(config, dtype)
    network.to_empty(device=device)
    network.reset_parameters()
    return network.eval().requires_grad_(False)


def sharing_weights(network: MagiHumanDiT, config: MagiHumanConfig) -> MagiHumanDiT:
    """A network with another config of the same layout (e.g. the 1080p SR model's local attention)
    whose tensors ARE `network`'s: for timing, where the weight values do not matter."""
    with torch.device("meta"):
        other = MagiHumanDiT(config)
    other.load_state_dict(network.state_dict(), strict=True, assign=True)
    return other.eval().requires_grad_(False)
