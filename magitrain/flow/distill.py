"""The distilled model's few-step sampler: predict x0, re-noise it with fresh noise, repeat."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .conditioning import condition_on_image, hold_clean
from .noise import gaussian
from .schedules import DEFAULT_SHIFT, flow_grid
from .velocity import VelocityFn


def distill_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor) -> Tensor:
    """x0 = x - s v, re-noised to the next level: `s' eps + (1 - s') x0` (just x0 when s' = 0)."""
    x0 = x - sigma * v
    return sigma_next * noise + (1 - sigma_next) * x0


def distilled_step(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_video: Tensor,
    noise_audio: Tensor,
    image_latent: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One whole step of the distilled sampler as a function of tensors (torch.compile takes it
    as one graph): image conditioning, the forward, and the re-noised x0 of both modalities."""
    video = condition_on_image(video, image_latent)
    v_video, v_audio = velocity_fn(video, audio, text, text_len)
    return distill_step(video, v_video, sigma, sigma_next, noise_video), distill_step(
        audio, v_audio, sigma, sigma_next, noise_audio
    )


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
    clean_video: Tensor | None = None,
    clean_audio: Tensor | None = None,
    step_fn=None,
) -> tuple[Tensor, Tensor]:
    """Run the n-step distilled sampler from noise (video [B,48,T,H,W], audio [B,N,64]) to clean latents.

    No guidance. Every step draws fresh noise, video before audio (the last step too, whose
    noise is multiplied by 0), so a seeded generator reproduces the released run.
    A given clean latent (`clean_audio`: audio-driven video, `clean_video`: video-to-audio) stands
    in for its modality at every step and is returned as is (`hold_clean`). The release's distilled
    path steps the audio even in a2v; we keep it fixed, as its UniPC path does (docs/inference.md).
    Its noise is still drawn, so the other modality's draws are those of an unconditioned run.
    `step_fn(video, audio, text, text_len, sigma, sigma_next, noise_video, noise_audio,
    image_latent)` replaces `distilled_step` over `velocity_fn` (e.g. a compiled one).
    """
    step_fn = step_fn or functools.partial(distilled_step, velocity_fn)
    _, sigmas = flow_grid(steps, shift)
    sigmas = sigmas.to(video.device)  # device scalars: a compiled step does not specialise on them
    video, audio = hold_clean(video, clean_video), hold_clean(audio, clean_audio)
    for i in range(steps):
        noise_video = gaussian(video.shape, generator, video.device)
        noise_audio = gaussian(audio.shape, generator, audio.device)
        args = (sigmas[i], sigmas[i + 1], noise_video, noise_audio, image_latent)
        video, audio = step_fn(video, audio, text, text_len, *args)
        video, audio = hold_clean(video, clean_video), hold_clean(audio, clean_audio)
    return condition_on_image(video, image_latent), audio
