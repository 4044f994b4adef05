"""The base model's sampler: UniPC with classifier-free guidance against a negative prompt."""

from __future__ import annotations

import torch
from torch import Tensor

from .conditioning import condition_on_image
from .guidance import Guidance, cfg
from .schedules import DEFAULT_SHIFT
from .unipc import unipc_scheduler
from .velocity import VelocityFn


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
) -> tuple[Tensor, Tensor]:
    """Denoise (video [B,48,T,H,W], audio [B,N,64]) from pure noise with UniPC, one solver per modality.

    Each step runs the model twice, with the prompt and with the negative prompt, and combines the
    velocities with `guidance` (default `Guidance()`: video 5 while t > 500, then 2; audio 5).
    Deterministic: no noise is drawn.
    """
    guidance = guidance or Guidance()
    video_solver, audio_solver = unipc_scheduler(steps, shift), unipc_scheduler(steps, shift)
    for t in video_solver.timesteps:
        video = condition_on_image(video, image_latent)
        v_cond = velocity_fn(video, audio, text, text_len)
        v_uncond = velocity_fn(video, audio, negative_text, negative_text_len)
        v_video = cfg(v_cond[0], v_uncond[0], guidance.video(int(t)))
        v_audio = cfg(v_cond[1], v_uncond[1], guidance.audio)
        video = video_solver.step(v_video, t, video).prev_sample
        audio = audio_solver.step(v_audio, t, audio).prev_sample
    return condition_on_image(video, image_latent), audio
