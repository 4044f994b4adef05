"""Classifier-free guidance of the base model (REFERENCE §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Standard classifier-free guidance `u + g (c - u)` (g = 1: the conditional prediction)."""
    return uncond + scale * (cond - uncond)


def voice_guided(velocity_fn, ref_audio: Tensor, scale: float = 1.0):
    """`velocity_fn` (a VelocityFn: video, audio, text, text_len, **kw) conditioned on the voice
    reference `ref_audio` [B, R, 64], with guidance `u + g (c - u)` against the same call without a
    reference (`scale` = 1: the conditioned prediction alone, one forward). The reference is a clean
    input, the same tensor at every step; it stands beside the prompt's CFG, which calls this once
    with the prompt and once with the negative prompt."""

    def velocity(video: Tensor, audio: Tensor, text: Tensor, text_len, **kwargs):
        cond = velocity_fn(video, audio, text, text_len, ref_audio=ref_audio, **kwargs)
        if scale == 1.0:
            return cond
        uncond = velocity_fn(video, audio, text, text_len, **kwargs)
        return tuple(cfg(c, u, scale) for c, u in zip(cond, uncond, strict=True))

    return velocity


@dataclass(frozen=True)
class Guidance:
    """Guidance scales: video `video_high` while t > `switch_t`, then `video_low`; audio constant."""

    video_high: float = 5.0
    video_low: float = 2.0
    switch_t: int = 500
    audio: float = 5.0

    def video(self, timestep: int) -> float:
        return self.video_high if timestep > self.switch_t else self.video_low


def sr_guidance_scales(
    latent_frames: int, scale: float = 3.5, trick_frames: int = 13, trick_value: float | None = 2.0
) -> Tensor:
    """[1, 1, T, 1, 1] video guidance of the SR stage with CFG, as released (`sr_cfg_number=2`):
    `scale` on every latent frame, at most `trick_value` on the first `trick_frames` (the release's
    "CFG trick" against over-exposure, on by default; None turns it off)."""
    scales = torch.full((1, 1, latent_frames, 1, 1), float(scale))
    if trick_value is not None:
        scales[:, :, :trick_frames] = min(trick_value, scale)
    return scales
