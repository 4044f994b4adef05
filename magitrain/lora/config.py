"""What a LoRA adapts: rank, alpha, target linears (names or patterns, layer ranges), sandwich mode."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from magitrain.errors import UserError

TARGETABLE = ("attention.linear_qkv", "attention.linear_proj", "mlp.up_gate_proj", "mlp.down_proj")
SANDWICH_MODES = ("per_copy", "shared_a")  # one A per modality copy, or one A shared by the copies
BASE_DTYPES = ("bf16", "fp8", "fp32")


@dataclass
class LoraConfig:
    rank: int = 64
    alpha: float = 64.0  # the delta is scaled by alpha / rank
    # Linears of each block to adapt: a name ("attention.linear_qkv", or just "linear_qkv") matches
    # that module in every chosen layer; anything else is a regular expression matched against the
    # full module name (e.g. "block\.layers\.(3|4)\.mlp\..*").
    targets: list[str] = field(default_factory=lambda: list(TARGETABLE))
    # Layers to adapt: null = all, a list of indices, or ranges as text: "0-3,36-39".
    layers: list[int] | str | None = None
    sandwich: str = "per_copy"  # per_copy | shared_a
    dropout: float = 0.0
    base_dtype: str = "bf16"  # storage of the frozen base's block linears: bf16 | fp8 (torchao) | fp32
    init: str | None = None  # an adapter .safetensors file to start from (same rank and targets)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [str(t) for t in self.targets]
        if isinstance(self.layers, int | float):  # one index, e.g. layers=5 on the command line
            self.layers = [self.layers]
        if self.layers is not None and not isinstance(self.layers, str):
            self.layers = [_number("layers", i, int, f"lora.layers[{n}]") for n, i in enumerate(self.layers)]
            if not self.layers:
                raise UserError("lora.layers is empty: give indices, a range like 0-3, or null for all")
        self.rank = _number("rank", self.rank, int)
        self.alpha, self.dropout = (
            _number("alpha", self.alpha, float),
            _number("dropout", self.dropout, float),
        )
        if self.rank <= 0:
            raise UserError(f"lora.rank must be a positive integer, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("lora.targets is empty: name at least one linear, e.g. attention.linear_qkv")
        for name, value, allowed in (
            ("lora.sandwich", self.sandwich, SANDWICH_MODES),
            ("lora.base_dtype", self.base_dtype, BASE_DTYPES),
        ):
            if value not in allowed:
                raise UserError(f"{name} must be one of {list(allowed)}, got {value!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
        if isinstance(self.layers, list):
            indices = self.layers
        else:
            indices = []
            for part in filter(None, (p.strip() for p in self.layers.split(","))):
                m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
                if not m:
                    raise UserError(f"lora.layers: {part!r} is neither an index nor a range like 4-35")
                lo, hi = int(m[1]), int(m[2] or m[1])
                if hi < lo:
                    raise UserError(f"lora.layers: the range {part!r} is empty (write it low-high)")
                indices += range(lo, hi + 1)
            if not indices:
                raise UserError(f"lora.layers={self.layers!r} names no layer: give indices or null for all")
        bad = sorted({i for i in indices if not 0 <= i < num_layers})
        if bad:
            raise UserError(f"lora.layers: indices {bad} are outside the model's layers 0-{num_layers - 1}")
        return sorted(set(indices))


def _number(name: str, value, kind: type, field: str | None = None) -> int | float:
    """`value` as `kind`; a string, a bool or (for an integer) a fraction is an error naming the field."""
    fraction = kind is int and isinstance(value, float) and not value.is_integer()
    if isinstance(value, bool) or not isinstance(value, int | float) or fraction:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{field or 'lora.' + name} must be {what}, got {value!r} ({type(value).__name__})")
    return kind(value)


def select_targets(module_names: list[str], cfg: LoraConfig, num_layers: int) -> list[str]:
    """The full names of the block linears to adapt; a target that matches none is an error."""
    layers = set(cfg.layer_indices(num_layers))
    chosen = [n for n in module_names if int(n.split(".")[2]) in layers]
    selected = set()
    for target in cfg.targets:
        if re.fullmatch(r"[\w.]+", target):
            hits = {n for n in chosen if n == target or n.endswith("." + target)}
        else:
            try:
                pattern = re.compile(target)
            except re.error as err:
                raise UserError(f"lora.targets: {target!r} is not a valid regular expression: {err}") from err
            hits = {n for n in chosen if pattern.fullmatch(n)}
        if not hits:
            raise UserError(
                f"lora.targets: {target!r} matches no linear in the chosen layers {cfg.layers or 'all'}; "
                f"the adaptable linears are block.layers.<i>.{{{','.join(TARGETABLE)}}}"
            )
        selected |= hits
    return [n for n in module_names if n in selected]
