"""Latent-space super-resolution (REFERENCE §3): upsample, re-noise, a few UniPC steps of the SR model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import condition_on_image
from .noise import gaussian
from .schedules import DEFAULT_SHIFT, sr_renoise_coefficient
from .unipc import unipc_scheduler
from .velocity import VelocityFn


def upsample_latent(video: Tensor, size: tuple[int, int, int]) -> Tensor:
    """video [B, 48, T, H, W] -> [B, 48, *size], trilinear with align_corners=True."""
    return F.interpolate(video, size=tuple(size), mode="trilinear", align_corners=True)


def vp_renoise(x: Tensor, a: Tensor, noise: Tensor) -> Tensor:
    """Variance-preserving re-noise `a x + sqrt(1 - a^2) eps`."""
    return a * x + (1 - a**2).sqrt() * noise


@torch.no_grad()
def sample_super_resolution(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None = None,
    *,
    size: tuple[int, int, int],
    generator: torch.Generator | None = None,
    steps: int = 5,
    shift: float = DEFAULT_SHIFT,
    noise_value: int = 220,
    audio_noise_scale: float = 0.7,
    image_latent: Tensor | None = None,
) -> Tensor:
    """Refine the clean base video latent [B,48,T,H,W] at the SR grid `size`; returns the SR video latent.

    `velocity_fn` is the SR model with its text coordinates (v1). The audio input
    `0.7 eps + 0.3 audio` is held fixed and the SR model's audio output is discarded: the
    base-stage audio is the final audio. Noise draws: video re-noise, then audio. `image_latent`
    is the reference image encoded at the SR resolution. No guidance.
    """
    x = upsample_latent(video, size)
    if noise_value:  # 0: no re-noise (and no draw), as released
        a = sr_renoise_coefficient(noise_value).to(x.device)
        x = vp_renoise(x, a, gaussian(x.shape, generator, x.device))
    eps_audio = gaussian(audio.shape, generator, audio.device)
    audio_in = audio_noise_scale * eps_audio + (1 - audio_noise_scale) * audio
    solver = unipc_scheduler(steps, shift)
    for t in solver.timesteps:
        x = condition_on_image(x, image_latent)
        v_video, _ = velocity_fn(x, audio_in, text, text_len)
        x = solver.step(v_video, t, x).prev_sample
    return condition_on_image(x, image_latent)
