"""LoRA fine-tuning of MagiHuman: per-modality adapters (a PEFT custom layer), the frozen bf16 / fp8
base, LoRA recipes, adapter files, merging and load-time application."""

from .adapters import (
    add_adapter,
    apply_adapters,
    build_frozen_base,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from .config import LoraConfig
from .layer import ModalityLoraLinear, SharedALoraLinear
from .recipe import LoraFlowMatchingModule, LoraMixin

__all__ = [
    "LoraConfig",
    "LoraFlowMatchingModule",
    "LoraMixin",
    "ModalityLoraLinear",
    "SharedALoraLinear",
    "add_adapter",
    "apply_adapters",
    "build_frozen_base",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
]
