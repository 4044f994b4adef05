"""Gaussian draws of the samplers, in the released RNG order."""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """float32 N(0, 1) drawn on the generator's device (so a seed gives the same numbers on any
    device), then moved to `device`. Without a generator: the global RNG of `device`."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=torch.float32).to(device)


def initial_latents(
    video_shape: tuple[int, ...],
    audio_shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Pure-noise starting latents (video [B, 48, T, H, W], audio [B, N, 64]); audio is drawn first."""
    audio = gaussian(tuple(audio_shape), generator, device)
    video = gaussian(tuple(video_shape), generator, device)
    return video, audio
