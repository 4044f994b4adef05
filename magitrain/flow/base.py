"""The base model's sampler: UniPC with classifier-free guidance against a negative prompt."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .conditioning import condition_on_image, hold_clean
from .guidance import Guidance, cfg
from .schedules import DEFAULT_SHIFT
from .unipc import unipc_scheduler
from .velocity import VelocityFn


def guided_velocity(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None,
    negative_text: Tensor,
    negative_text_len: Tensor | None,
    video_scale: Tensor,
    audio_scale: Tensor,
    image_latent: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A base-sampler step up to the solver update, as a function of tensors (torch.compile takes
    it as one graph): image conditioning, the prompt and negative-prompt forwards, and their CFG
    combination -> (conditioned video, v_video, v_audio)."""
    video = condition_on_image(video, image_latent)
    v_cond = velocity_fn(video, audio, text, text_len)
    v_uncond = velocity_fn(video, audio, negative_text, negative_text_len)
    return video, cfg(v_cond[0], v_uncond[0], video_scale), cfg(v_cond[1], v_uncond[1], audio_scale)


@torch.no_grad()
def sample_base(
    velocity_fn: VelocityFn,
    video: Tensor,
    audio: Tensor,
    text: Tensor,
    text_len: Tensor | None,
    negative_text: Tensor,
    negative_text_len: Tensor | None = None,
    *,
    steps: int = 32,
    shift: float = DEFAULT_SHIFT,
    guidance: Guidance | None = None,
    image_latent: Tensor | None = None,
    clean_video: Tensor | None = None,
    clean_audio: Tensor | None = None,
    step_fn=None,
) -> tuple[Tensor, Tensor]:
    """Denoise (video [B,48,T,H,W], audio [B,N,64]) from pure noise with UniPC, one solver per modality.

    Each step runs the model twice, with the prompt and with the negative prompt, and combines the
    velocities with `guidance` (default `Guidance()`: video 5 while t > 500, then 2; audio 5).
    Deterministic: no noise is drawn. A given clean latent (`clean_audio`: audio-driven video,
    `clean_video`: video-to-audio) stands in for its modality at every step and is returned as is
    (`hold_clean`); only the other modality is denoised, as the release's `is_a2v`. `step_fn`
    (same arguments as `guided_velocity` after `velocity_fn`) replaces `guided_velocity` over
    `velocity_fn`, e.g. a compiled one; the UniPC updates stay outside it (diffusers' solver keeps
    its history in Python state).
    """
    guidance = guidance or Guidance()
    step_fn = step_fn or functools.partial(guided_velocity, velocity_fn)
    video_solver, audio_solver = unipc_scheduler(steps, shift), unipc_scheduler(steps, shift)
    negative = (negative_text, negative_text_len)
    audio_scale = torch.tensor(guidance.audio, device=video.device)
    video, audio = hold_clean(video, clean_video), hold_clean(audio, clean_audio)
    for t in video_solver.timesteps:
        video_scale = torch.tensor(guidance.video(int(t)), device=video.device)
        video, v_video, v_audio = step_fn(
            video, audio, text, text_len, *negative, video_scale, audio_scale, image_latent
        )
        video = hold_clean(video_solver.step(v_video, t, video).prev_sample, clean_video)
        audio = hold_clean(audio_solver.step(v_audio, t, audio).prev_sample, clean_audio)
    return condition_on_image(video, image_latent), audio
