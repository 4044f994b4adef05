"""Training callbacks: checkpoints, EMA, throughput/MFU/memory, RNG state, validation samples."""

from .checkpoint import RunCheckpoint
from .ema import EMA
from .rng import RNGState
from .throughput import Throughput
from .validation import Validation

__all__ = ["EMA", "RNGState", "RunCheckpoint", "Throughput", "Validation"]
