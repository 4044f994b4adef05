"""LoRA fine-tuning of MagiHuman: per-modality adapters (a PEFT custom layer), the frozen bf16 / fp8
base, LoRA recipes (flow matching, SR, LoRA-DMD), adapter files, merging and load-time application."""

from .adapters import (
    add_adapter,
    apply_adapters,
    build_frozen_base,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from .config import LoraConfig
from .dmd import LoraDMD2Module, LoraSRDMD2Module
from .layer import ModalityLoraLinear
from .recipe import LoraFlowMatchingModule, LoraMixin, LoraSRFineTuneModule

__all__ = [
    "LoraConfig",
    "LoraDMD2Module",
    "LoraFlowMatchingModule",
    "LoraMixin",
    "LoraSRDMD2Module",
    "LoraSRFineTuneModule",
    "ModalityLoraLinear",
    "add_adapter",
    "apply_adapters",
    "build_frozen_base",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
]
