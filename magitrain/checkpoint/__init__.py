"""Checkpoints in the released layout (sharded safetensors) and export from training checkpoints."""

from .official import CheckpointMismatchError, check_layout, load_official, save_official

__all__ = ["CheckpointMismatchError", "check_layout", "load_official", "save_official"]
