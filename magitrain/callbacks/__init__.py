"""Training callbacks: checkpoints, non-finite step guard, EMA, throughput/MFU, RNG state, validation."""

from .checkpoint import RunCheckpoint
from .ema import EMA
from .nonfinite import NonFiniteGuard
from .rng import RNGState
from .throughput import Throughput
from .validation import Validation

__all__ = ["EMA", "NonFiniteGuard", "RNGState", "RunCheckpoint", "Throughput", "Validation"]
