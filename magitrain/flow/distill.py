"""The distilled model's few-step sampler: predict x0, re-noise it with fresh noise, repeat."""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import condition_on_image
from .noise import gaussian
from .schedules import DEFAULT_SHIFT, flow_grid
from .velocity import VelocityFn


def distill_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor) -> Tensor:
    """x0 = x - s v, re-noised to the next level: `s' eps + (1 - s') x0` (just x0 when s' = 0)."""
    x0 = x - sigma * v
    return sigma_next * noise + (1 - sigma_next) * x0


@torch.no_grad()
def sample_distilled(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    steps: int = 8,
    shift: float = DEFAULT_SHIFT,
    image_latent: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the n-step distilled sampler from noise (video [B,48,T,H,W], audio [B,N,64]) to clean latents.

    No guidance. Every step draws fresh noise, video before audio (the last step too, whose
    noise is multiplied by 0), so a seeded generator reproduces the released run.
    """
    _, sigmas = flow_grid(steps, shift)
    for i in range(steps):
        video = condition_on_image(video, image_latent)
        v_video, v_audio = velocity_fn(video, audio, text, text_len)
        s, s_next = sigmas[i], sigmas[i + 1]
        video = distill_step(video, v_video, s, s_next, gaussian(video.shape, generator, video.device))
        audio = distill_step(audio, v_audio, s, s_next, gaussian(audio.shape, generator, audio.device))
    return condition_on_image(video, image_latent), audio
