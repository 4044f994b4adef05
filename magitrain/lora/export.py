"""Export a LoRA training checkpoint: the adapter file, or the base with the adapter merged in.

Called by `python -m magitrain.export` when the checkpoint's hyper-parameters say LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from magitrain.checkpoint import load_official, save_official
from magitrain.errors import UserError
from magitrain.model import MagiHumanConfig, MagiHumanDiT

from .adapters import ARCH_FIELDS, EMA, TRAINED, adapter_tensors, merge_adapter, metadata, save_adapter
from .config import LoraConfig


def export_lora(
    state: dict[str, torch.Tensor],
    hparams: dict,
    out: str | Path,
    source: str,
    ema: bool = False,
    merge: bool = False,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    config = MagiHumanConfig(**hparams["model"])
    run_cfg = LoraConfig(**hparams["lora"])
    tensors = adapter_tensors(state, EMA if ema else TRAINED, prefix="model.")
    if not tensors:
        what = "EMA adapter weights (train with the EMA callback)" if ema else "adapter weights"
        raise UserError(f"{source} holds no {what}")
    targets = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in tensors))
    cfg = LoraConfig(rank=run_cfg.rank, alpha=run_cfg.alpha, targets=targets, sandwich=run_cfg.sandwich)
    if not merge:
        return save_adapter(out, tensors, metadata(cfg, config, targets))
    base = base or hparams.get("init")
    if not base:
        raise UserError(
            f"--merge needs the base weights: {source} was trained without init, pass --base PATH"
        )
    from magitrain.checkpoint.official import block_linear_dtype
    from magitrain.inference.networks import to_inference_dtype

    # --dtype keep: the base's own storage (bf16 as released), not float32 (57 GiB for the 15B model)
    dtype = dtype or block_linear_dtype(base)
    with torch.device("meta"):
        network = MagiHumanDiT(config)
    to_inference_dtype(network, dtype)  # block linears in the output dtype, no fp32 detour
    weights = load_official(network, base).state_dict()
    merge_adapter(weights, tensors, cfg, {f: getattr(config, f) for f in ARCH_FIELDS})
    return save_official(
        weights, out, dtype=dtype, max_shard_size=max_shard_size, config=config,
        sampling=hparams.get("sampling"),
    )  # fmt: skip
