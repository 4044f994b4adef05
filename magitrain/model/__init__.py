"""The MagiHuman single-stream transformer and its configuration presets."""

from .attention import attention
from .config import (
    MagiHumanConfig,
    get_config,
    golden_tiny,
    magihuman_15b,
    magihuman_15b_sr540,
    magihuman_15b_sr1080,
    tiny,
    tiny_sr1080,
)
from .dit import MagiHumanDiT, count_parameters, patchify, unpatchify
from .layout import SequenceLayout

__all__ = [
    "MagiHumanConfig",
    "MagiHumanDiT",
    "SequenceLayout",
    "attention",
    "count_parameters",
    "get_config",
    "golden_tiny",
    "magihuman_15b",
    "magihuman_15b_sr540",
    "magihuman_15b_sr1080",
    "patchify",
    "tiny",
    "tiny_sr1080",
    "unpatchify",
]
