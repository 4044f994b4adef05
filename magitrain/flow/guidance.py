"""Classifier-free guidance of the base model (REFERENCE §2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Standard classifier-free guidance `u + g (c - u)` (g = 1: the conditional prediction)."""
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class Guidance:
    """Guidance scales: video `video_high` while t > `switch_t`, then `video_low`; audio constant."""

    video_high: float = 5.0
    video_low: float = 2.0
    switch_t: int = 500
    audio: float = 5.0

    def video(self, timestep: int) -> float:
        return self.video_high if timestep > self.switch_t else self.video_low
