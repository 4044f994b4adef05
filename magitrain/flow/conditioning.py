"""Conditioning on given latents: the reference image's latent replaces latent frame 0
(image-to-video), a given clean modality replaces the sampler's latent of it (audio-driven video,
video-to-audio)."""

from __future__ import annotations

from torch import Tensor


def condition_on_image(video: Tensor, image_latent: Tensor | None) -> Tensor:
    """video [B, C, T, H, W] with frame 0 overwritten by image_latent [B, C, 1, H, W] (None: unchanged).

    The samplers apply it before every model call and once more to the final latent.
    """
    if image_latent is None:
        return video
    expected = (*video.shape[:2], 1, *video.shape[3:])
    if tuple(image_latent.shape) != expected:
        raise ValueError(f"image_latent must be {expected} for this video, got {tuple(image_latent.shape)}")
    video = video.clone()
    video[:, :, :1] = image_latent.to(video.dtype)
    return video


def hold_clean(latent: Tensor, clean: Tensor | None) -> Tensor:
    """`clean` in place of a modality's latent when that modality is given (None: `latent`).

    The samplers apply it to the starting noise and after every update, so the model sees the given
    latent itself, bit for bit, at every step (the model is timestep-free: a clean input is the
    whole condition), and it is what they return for that modality.
    """
    if clean is None:
        return latent
    if clean.shape != latent.shape:
        raise ValueError(f"the clean latent must be {tuple(latent.shape)}, got {tuple(clean.shape)}")
    return clean.to(latent.device)
