"""Training callbacks: checkpoints, non-finite step guard, EMA, throughput/MFU, RNG state, validation,
the console's progress bar and model summary."""

from .checkpoint import RunCheckpoint
from .console import ModelSummary, ProgressBar
from .ema import EMA
from .nonfinite import NonFiniteGuard
from .rng import RNGState
from .throughput import Throughput
from .validation import Validation

__all__ = [
    "EMA",
    "ModelSummary",
    "NonFiniteGuard",
    "ProgressBar",
    "RNGState",
    "RunCheckpoint",
    "Throughput",
    "Validation",
]
