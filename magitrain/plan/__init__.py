"""Will it fit? Per-GPU memory of a training config, from a real step on fake tensors."""

from .planner import Plan, compose, plan
from .step import StepMemory, measure_step

__all__ = ["Plan", "StepMemory", "compose", "measure_step", "plan"]
