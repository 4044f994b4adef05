"""Latent-space super-resolution (REFERENCE §3): upsample, re-noise, a few UniPC steps of the SR model
(or a distilled SR student's few x0-and-re-noise steps)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import guided_velocity
from .conditioning import condition_on_image
from .dmd import simulate
from .noise import gaussian
from .schedules import DEFAULT_SHIFT, flow_grid, sr_renoise_coefficient
from .unipc import unipc_scheduler
from .velocity import VelocityFn

SR_SAMPLERS = ("unipc", "distilled")  # the released solver | a DMD-2 student's (recipe=sr_dmd2_*)


def upsample_latent(video: Tensor, size: tuple[int, int, int]) -> Tensor:
    """video [B, 48, T, H, W] -> [B, 48, *size], trilinear with align_corners=True."""
    return F.interpolate(video, size=tuple(size), mode="trilinear", align_corners=True)


def vp_renoise(x: Tensor, a: Tensor, noise: Tensor) -> Tensor:
    """Variance-preserving re-noise `a x + sqrt(1 - a^2) eps`."""
    return a * x + (1 - a**2).sqrt() * noise


def conditioned_velocity(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None,
    image_latent: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """An SR step up to the solver update (torch.compile takes it as one graph): image
    conditioning and the forward -> (conditioned video, v_video); the audio output is discarded."""
    video = condition_on_image(video, image_latent)
    return video, velocity_fn(video, audio, text, text_len)[0]


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
    negative_text: Tensor | None = None,
    negative_text_len: Tensor | None = None,
    guidance_scale: Tensor | None = None,
    step_fn=None,
    sampler: str = "unipc",
) -> Tensor:
    """Refine the clean base video latent [B,48,T,H,W] at the SR grid `size`; returns the SR video latent.

    `velocity_fn` is the SR model with its text coordinates (v1). The audio input
    `0.7 eps + 0.3 audio` is held fixed and the SR model's audio output is discarded: the
    base-stage audio (in audio-driven video the given one, as released) is the final audio. Noise
    draws: video re-noise, then audio. `image_latent` is the reference image encoded at the SR
    resolution. No guidance (the release's shipped configs), unless `guidance_scale` (per latent
    frame, `sr_guidance_scales`) is given: then CFG against the negative prompt, as the release's
    `sr_cfg_number=2`. `step_fn` replaces `conditioned_velocity` (`guided_velocity` with guidance)
    over `velocity_fn` (e.g. a compiled one); UniPC updates stay outside.

    `sampler="distilled"`: a DMD-2 SR student's sampler (`dmd.simulate`: predict x0, re-noise it
    towards a fresh source) on the `steps`-step shifted grid, same source and audio; no guidance.
    """
    guided = guidance_scale is not None
    if sampler not in SR_SAMPLERS:
        raise ValueError(f"SR sampler must be one of {', '.join(SR_SAMPLERS)}, got {sampler!r}")
    if guided and negative_text is None:
        raise ValueError("SR guidance needs the negative prompt's embedding (negative_text)")
    if guided and sampler == "distilled":
        raise ValueError("a distilled SR student samples without guidance (its teacher ran without CFG)")
    step_fn = step_fn or functools.partial(guided_velocity if guided else conditioned_velocity, velocity_fn)
    up = upsample_latent(video, size)
    a = sr_renoise_coefficient(noise_value).to(up.device) if noise_value else None
    # 0: no re-noise (and no draw), as released
    x = up if a is None else vp_renoise(up, a, gaussian(up.shape, generator, up.device))
    eps_audio = gaussian(audio.shape, generator, audio.device)
    audio_in = audio_noise_scale * eps_audio + (1 - audio_noise_scale) * audio
    if sampler == "distilled":

        def student(x: dict[str, Tensor], s: Tensor) -> dict[str, Tensor]:
            return {"video": step_fn(x["video"], audio_in, text, text_len, image_latent)[1]}

        def source(modality: str, eps: Tensor) -> Tensor:
            return up if a is None else vp_renoise(up, a, eps)

        sigmas = flow_grid(steps, shift)[1][:-1].tolist()
        x = simulate(student, {"video": x}, sigmas, steps - 1, generator=generator, source=source)["video"]
        return condition_on_image(x.to(up.dtype), image_latent)
    solver = unipc_scheduler(steps, shift)
    if guided:
        scale, one = guidance_scale.to(x.device), torch.ones((), device=x.device)  # audio output unused
    for t in solver.timesteps:
        if guided:
            x, v_video, _ = step_fn(
                x, audio_in, text, text_len, negative_text, negative_text_len, scale, one, image_latent
            )
        else:
            x, v_video = step_fn(x, audio_in, text, text_len, image_latent)
        x = solver.step(v_video, t, x).prev_sample
    return condition_on_image(x, image_latent)
