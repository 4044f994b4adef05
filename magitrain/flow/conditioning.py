"""Image-to-video conditioning: the reference image's latent replaces latent frame 0."""

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
