"""Training callbacks: EMA, throughput/MFU/memory, RNG state."""

from .ema import EMA
from .rng import RNGState
from .throughput import Throughput

__all__ = ["EMA", "RNGState", "Throughput"]
