"""Adapters on a MagiHumanDiT: the frozen low-precision base, PEFT injection, adapter files, merging.

Adapter file (safetensors), keyed to the released layout: for the released weight
`block.layers.{i}.{attention.linear_qkv|attention.linear_proj|mlp.up_gate_proj|mlp.down_proj}.weight`
[copies * out, in] it holds `....lora_A.weight` [copies * r, in] (or [r, in] with a shared A) and
`....lora_B.weight` [copies * out, r], float32, copies stacked video, audio, text like the base.
Copy c's delta is `alpha / r * B_c @ A_c`. The metadata holds format, rank, alpha, sandwich mode,
the target module names and the architecture the adapter belongs to (docs/training.md, LoRA).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import torch
from peft import inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from magitrain.checkpoint import load_official
from magitrain.errors import UserError
from magitrain.model import MagiHumanConfig, MagiHumanDiT
from magitrain.model.layers import ModalityLinear

from .config import LoraConfig, select_targets
from .layer import ModalityLoraConfig, ModalityLoraLinear, lora_delta

FORMAT = "magitrain-lora"
FORMAT_VERSION = "1"
# The fields that fix the adapted weights' names and shapes, and coords_style, which tells the base
# network (v2) from the SR networks (v1) whose weights have the same shapes
ARCH_FIELDS = (
    "num_layers", "hidden_size", "head_dim", "num_heads_q", "num_heads_kv", "swiglu_hidden",
    "gelu_hidden", "sandwich_layers", "gelu7_layers", "attn_gating", "coords_style",
)  # fmt: skip
NETWORK_KIND = {"v1": "an SR network", "v2": "the base network"}
BASE_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp32": torch.float32}
TRAINED, EMA = "default", "ema"  # the trained adapter's name and its EMA shadow's


def build_frozen_base(
    config: MagiHumanConfig, init: str | None, base_dtype: str = "bf16", device: str | torch.device = "cpu"
) -> MagiHumanDiT:
    """The frozen base network with its block linears stored in `base_dtype`, never in float32 first.

    Norms, embedders and output heads (0.1% of the parameters) stay float32 as released.
    """
    from magitrain.inference.networks import to_inference_dtype

    with torch.device("meta"):
        network = MagiHumanDiT(config)
    to_inference_dtype(network, BASE_TORCH_DTYPES[base_dtype])
    if init:
        load_official(network, init)
    else:  # training-from-scratch init: toy runs, tests and memory measurements
        network.to_empty(device=device)
        network.reset_parameters()
    network.requires_grad_(False)
    if base_dtype == "fp8":
        quantize_fp8(network)
    return network


def share_frozen(network: MagiHumanDiT) -> MagiHumanDiT:
    """Another module tree over the very same parameter and buffer tensors (no memory of its own).

    LoRA-DMD puts the student's and the critic's adapters on two such trees of one frozen base,
    whose plain tree is the teacher: one 15B base in memory, and each role a real module, so
    activation checkpointing recomputes each role with its own adapters. Call it before adapters
    are injected (they would be copied, not shared).
    """
    if lora_layers(network):
        raise ValueError("share_frozen: the network already carries adapters")
    shared = {id(t): t for t in itertools.chain(network.parameters(), network.buffers())}
    return copy.deepcopy(network, memo=shared)


def quantize_fp8(network: MagiHumanDiT) -> None:
    """Store the block linears as float8 (e4m3, one scale per output row) with torchao."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise UserError("lora.base_dtype=fp8 needs torchao: pip install torchao") from err
    quantize_(network.block, Float8WeightOnlyConfig(), filter_fn=lambda m, _: isinstance(m, ModalityLinear))


def block_linears(network: MagiHumanDiT) -> list[str]:
    """Names of the block linears, adapted (a LoRA layer around the linear) or not."""
    return [
        n
        for n, m in network.named_modules()
        if isinstance(m, ModalityLoraLinear)
        or (isinstance(m, ModalityLinear) and not n.endswith(".base_layer"))
    ]


def add_adapter(network: MagiHumanDiT, cfg: LoraConfig, name: str = "default") -> list[str]:
    """Inject adapter `name` into the targets of `cfg` (PEFT, our layer); returns the target names."""
    targets = select_targets(block_linears(network), cfg, network.config.num_layers)
    peft_cfg = ModalityLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        shared_a=cfg.sandwich == "shared_a",
    )
    peft_cfg._register_custom_module({ModalityLinear: ModalityLoraLinear})
    inject_adapter_in_model(peft_cfg, network, adapter_name=name)
    return targets


def lora_layers(network: torch.nn.Module) -> dict[str, ModalityLoraLinear]:
    return {n: m for n, m in network.named_modules() if isinstance(m, ModalityLoraLinear)}


def set_active(network: torch.nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters used in the forward (and the trainable ones); the base stays frozen."""
    for layer in lora_layers(network).values():
        layer.set_adapter(names)
        layer.get_base_layer().requires_grad_(False)


def is_adapter_key(key: str, adapter: str | None = None) -> bool:
    parts = key.split(".")
    for i, part in enumerate(parts[:-2]):
        if part in ("lora_A", "lora_B") and (adapter is None or parts[i + 1] == adapter):
            return True
    return False


def file_key(key: str, adapter: str) -> str:
    """`....lora_A.<adapter>.weight` -> `....lora_A.weight` (the adapter file's name)."""
    return key.replace(f".lora_A.{adapter}.", ".lora_A.").replace(f".lora_B.{adapter}.", ".lora_B.")


def adapter_tensors(state: dict[str, Tensor], adapter: str, prefix: str = "") -> dict[str, Tensor]:
    """The adapter file tensors of adapter `adapter` in a (module) state dict whose keys start with prefix."""
    return {
        file_key(k[len(prefix) :], adapter): v.detach().float().cpu().contiguous()
        for k, v in state.items()
        if k.startswith(prefix) and is_adapter_key(k, adapter)
    }


def metadata(cfg: LoraConfig, config: MagiHumanConfig, targets: list[str]) -> dict[str, str]:
    arch = {f: getattr(config, f) for f in ARCH_FIELDS}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": str(cfg.rank),
        "alpha": repr(cfg.alpha),
        "sandwich": cfg.sandwich,
        "targets": json.dumps(targets),
        "architecture": json.dumps(arch),
    }


def save_adapter(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_adapter(path: str | Path, field: str = "lora") -> tuple[dict[str, Tensor], LoraConfig, dict]:
    """(tensors, the LoRA config it was made with, architecture fields) of an adapter file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "adapter.safetensors"
    if not path.is_file():
        raise UserError(f"{field}={path}: no such adapter file")
    try:
        with safe_open(path, framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"{field}={path} is not a readable safetensors file: {err}") from err
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{field}={path} is not a magitrain LoRA adapter (metadata format={meta.get('format')!r})"
        )
    try:
        cfg = LoraConfig(
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            targets=json.loads(meta["targets"]),
            sandwich=meta["sandwich"],
        )
        arch = json.loads(meta["architecture"])
    except (KeyError, ValueError) as err:
        raise UserError(f"{field}={path}: bad or missing adapter metadata {err}") from err
    return tensors, cfg, arch


def check_architecture(arch: dict, config: MagiHumanConfig, source: str) -> None:
    for f in ARCH_FIELDS:
        want = getattr(config, f)
        got = tuple(arch[f]) if isinstance(want, tuple) and f in arch else arch.get(f)
        if got != want and f == "coords_style":
            raise UserError(
                f"{source} is an adapter for {NETWORK_KIND.get(got, f'coords_style={got}')}, "
                f"not for {NETWORK_KIND[want]} (coords_style {got} vs {want}): base adapters go to lora=, "
                "SR adapters to sr_lora="
            )
        if got != want:
            raise UserError(
                f"{source} is an adapter for another architecture: its {f} is {got}, the network's is {want}"
            )


def expected_shapes(network: MagiHumanDiT, cfg: LoraConfig, targets: list[str]) -> dict[str, tuple]:
    modules = dict(network.named_modules())
    shapes = {}
    for name in targets:
        base = modules[name]
        base = base.get_base_layer() if isinstance(base, ModalityLoraLinear) else base
        copies = base.copies
        a_rows = cfg.rank if cfg.sandwich == "shared_a" else copies * cfg.rank
        shapes[f"{name}.lora_A.weight"] = (a_rows, base.in_features)
        shapes[f"{name}.lora_B.weight"] = (base.out_features, cfg.rank)
    return shapes


def check_tensors(tensors: dict[str, Tensor], shapes: dict[str, tuple], source: str) -> None:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = sorted(
        f"{k} (file {list(tensors[k].shape)}, expected {list(shapes[k])})"
        for k in set(shapes) & set(tensors)
        if tuple(tensors[k].shape) != shapes[k]
    )
    for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            raise UserError(f"{source}: {len(keys)} {kind} adapter tensors: {shown}")


@torch.no_grad()
def load_adapter(network: MagiHumanDiT, tensors: dict[str, Tensor], adapter: str, source: str) -> None:
    """Copy adapter-file tensors into adapter `adapter` of `network`, strictly."""
    params = {file_key(k, adapter): p for k, p in network.named_parameters() if is_adapter_key(k, adapter)}
    check_tensors(tensors, {k: tuple(p.shape) for k, p in params.items()}, source)
    for k, p in params.items():
        p.copy_(tensors[k])


def read_checked_adapter(path: str, network: MagiHumanDiT, field: str):
    """Read an adapter file and check it against `network`'s architecture and its own metadata."""
    tensors, cfg, arch = read_adapter(path, field)
    check_architecture(arch, network.config, f"{field}={path}")
    missing = sorted(set(cfg.targets) - set(block_linears(network)))
    if missing:
        raise UserError(f"{field}={path} targets linears the network does not have: {missing[:5]}")
    check_tensors(tensors, expected_shapes(network, cfg, cfg.targets), f"{field}={path} (rank {cfg.rank})")
    return tensors, cfg


def apply_adapters(network: MagiHumanDiT, paths, scales, field: str = "lora") -> MagiHumanDiT:
    """Apply adapter files with their scales at load time (no merge): infer.py `lora=` / `lora_scale=`
    (`field` names the argument in errors: `sr_lora` for the SR network's)."""
    paths, scales = adapter_arguments(paths, scales, field)
    names = []
    for i, (path, scale) in enumerate(zip(paths, scales, strict=True)):
        tensors, cfg = read_checked_adapter(path, network, field)
        name = f"lora{i}"
        add_adapter(network, cfg, name)
        load_adapter(network, tensors, name, f"{field}={path}")
        for layer in lora_layers(network).values():
            if name in layer.scaling:
                layer.scaling[name] = cfg.scaling * scale
        names.append(name)
    set_active(network, names)
    network.requires_grad_(False)
    return network


def adapter_arguments(paths, scales, field: str = "lora") -> tuple[list[str], list[float]]:
    """Normalise `lora=PATH | [PATHS]` and `lora_scale=FLOAT | [FLOATS]`; errors name the argument."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    scales = [scales] * len(paths) if not isinstance(scales, list | tuple) and scales is not None else scales
    if scales is None or len(scales) != len(paths):
        raise UserError(f"{field}_scale must be one number or one per adapter ({len(paths)}), got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int | float):
            raise UserError(
                f"{field}_scale must be a number (or a list of numbers), got {s!r} ({type(s).__name__})"
            )
    return [str(p) for p in paths], [float(s) for s in scales]


@torch.no_grad()
def merge_adapter(
    weights: dict[str, Tensor], tensors: dict[str, Tensor], cfg: LoraConfig, arch: dict, scale: float = 1.0
) -> dict[str, Tensor]:
    """Add an adapter's deltas to released-layout `weights` in place (float32 arithmetic)."""
    sandwich = set(arch["sandwich_layers"])
    for target in cfg.targets:
        key = f"{target}.weight"
        copies = 3 if int(target.split(".")[2]) in sandwich else 1
        a, b = tensors[f"{target}.lora_A.weight"], tensors[f"{target}.lora_B.weight"]
        delta = lora_delta(a, b, copies, cfg.scaling * scale)
        weights[key] = (weights[key].float() + delta).to(weights[key].dtype)
    return weights
