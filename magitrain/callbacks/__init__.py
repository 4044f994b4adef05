"""Training callbacks: EMA, throughput/MFU/memory, RNG state, validation samples."""

from .ema import EMA
from .rng import RNGState
from .throughput import Throughput
from .validation import Validation

__all__ = ["EMA", "RNGState", "Throughput", "Validation"]
