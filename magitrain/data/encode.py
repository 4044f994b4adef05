"""Raw batch -> latent batch with the frozen codecs: the light hook a training module calls on the
device after the batch is transferred (raw mode), and what encode_shards.py runs offline."""

import torch
import torch.nn.functional as F

from magitrain.codecs.media import to_pixels
from magitrain.data.buckets import VAE_TIME_STRIDE


def resize_video(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, F, H, W] pixels (uint8 or float) -> [B, 3, F, height, width], antialiased bilinear.

    The SR low-resolution clip: resized to exactly `size = (height, width)` with no crop, because the
    SR sampler stretches the whole base-stage latent to the SR grid (1920x1088 <- 448x256 is not one
    aspect ratio); training pairs must show the model that same mapping.
    """
    B, C, n, H, W = video.shape
    height, width = size
    if height > H or width > W:
        raise ValueError(f"SR LR size {width}x{height} is larger than the HR clip {W}x{H}")
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * n, C, H, W).float()
    low = F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True)
    low = low.round().clamp(0, 255).to(torch.uint8) if video.dtype == torch.uint8 else low.to(video.dtype)
    return low.reshape(B, n, C, height, width).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def encode_raw_batch(batch: dict, codecs) -> dict:
    """`{video [B,3,F,H,W] uint8 (or float in [-1, 1]), audio [B,C,S], sample_rate, caption, ...}` ->
    the latent-mode batch dict:
    video_latent [B,48,T,H/16,W/16] (normalised), audio_latent [B,4(T-1)+1,64], text_emb + text_len,
    and the raw batch's audio_mask.

    The audio latent length is pinned to the video's frame count, so an audio track a few ms off
    the video never shifts the one-token-per-frame alignment.
    """
    video_latent = codecs.video.encode(to_pixels(batch["video"]))
    frames = VAE_TIME_STRIDE * (video_latent.shape[2] - 1) + 1
    audio_latent = codecs.audio.encode(batch["audio"], batch["sample_rate"], num_frames=frames)
    text_emb, text_len = codecs.text.encode(list(batch["caption"]))
    out = {
        "video_latent": video_latent,
        "audio_latent": audio_latent.to(video_latent.device),
        "text_emb": text_emb.to(video_latent.device),
        "text_len": text_len.to(video_latent.device),
        "key": batch["key"],
        "caption": batch["caption"],
        "language": batch["language"],
    }
    if "audio_mask" in batch:
        out["audio_mask"] = batch["audio_mask"].to(video_latent.device)
    if "ref_image" in batch:
        out["ref_latent"] = codecs.video.encode_image(to_pixels(batch["ref_image"]))
    return out
