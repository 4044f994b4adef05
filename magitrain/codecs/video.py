"""The Wan2.2 video VAE (diffusers `AutoencoderKLWan`) behind the interface the transformer needs.

Pixels `[B, 3, F, H, W]` in [-1, 1] with F = 4k+1 <-> normalised latents `[B, 48, k+1, H/16, W/16]`.
The transformer sees `(z - mean) / std` with the 48 per-channel statistics of REFERENCE.md §6.
"""

import torch
from diffusers import AutoencoderKLWan
from torch import nn

LATENT_CHANNELS = 48
STRIDE_T, STRIDE_S = 4, 16

# Per-channel statistics of the Wan2.2 latent space (REFERENCE.md §6).
LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip


class VideoCodec(nn.Module):
    """Frozen Wan2.2 VAE. `decode_tile` (pixels) bounds decode memory at 540p/1080p.

    Time is always processed chunk by chunk (the VAE is causal and caches features between
    4-frame chunks); `decode_tile` adds spatial tiles with overlap blending on top of that.
    """

    def __init__(self, vae: AutoencoderKLWan, decode_tile: int | None = None):
        super().__init__()
        cfg = vae.config
        stride_s = cfg.scale_factor_spatial
        if (cfg.z_dim, cfg.scale_factor_temporal, stride_s) != (LATENT_CHANNELS, STRIDE_T, STRIDE_S):
            raise ValueError(
                f"VideoCodec needs the Wan2.2 VAE layout (z_dim 48, stride 4x16x16), got z_dim {cfg.z_dim}, "
                f"stride {cfg.scale_factor_temporal}x{stride_s}x{stride_s}"
            )
        if decode_tile is not None and decode_tile % (2 * STRIDE_S):
            raise ValueError(f"VideoCodec: decode_tile must be a multiple of 32 px, got {decode_tile}")
        self.vae = vae.eval().requires_grad_(False)
        self.decode_tile = decode_tile
        self.register_buffer("mean", torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """`[B, 3, F, H, W]` in [-1, 1] -> normalised latents `[B, 48, (F-1)/4+1, H/16, W/16]` (float32).

        `sample=True` draws from the posterior (a training augmentation); default is its mean.
        """
        check_pixels(pixels)
        posterior = self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return (z.float() - self.mean) / self.std

    def encode_image(self, image: torch.Tensor, **kwargs) -> torch.Tensor:
        """Reference image `[B, 3, H, W]` in [-1, 1] -> `[B, 48, 1, H/16, W/16]` (a 1-frame clip)."""
        if image.ndim != 4:
            raise ValueError(f"VideoCodec.encode_image expects [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode(image.unsqueeze(2), **kwargs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, 48, T, h, w]` -> pixels `[B, 3, 4T-3, 16h, 16w]` in [-1, 1], float32."""
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"VideoCodec.decode expects [B, 48, T, h, w], got {tuple(latents.shape)}")
        z = (latents.float() * self.std + self.mean).to(self.vae.device, self.dtype)
        if self.decode_tile is not None and max(z.shape[-2:]) * STRIDE_S > self.decode_tile:
            return self._tiled_decode(z).float()
        return self.vae.decode(z).sample.float()

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        # diffusers' own tiler; set its tile sizes directly rather than `enable_tiling()`, which would
        # also switch on its tiled *encode* (not needed: encoding runs in the data pipeline, batch 1).
        vae, tile = self.vae, self.decode_tile
        vae.tile_sample_min_height = vae.tile_sample_min_width = tile
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = tile * 3 // 4
        return vae.tiled_decode(z).sample


def check_pixels(pixels: torch.Tensor) -> None:
    """Specific errors for the mistakes that otherwise surface deep inside the VAE (or not at all)."""
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"VideoCodec.encode expects pixels [B, 3, F, H, W], got {tuple(pixels.shape)}")
    frames, height, width = pixels.shape[2:]
    if (frames - 1) % STRIDE_T:
        raise ValueError(
            f"VideoCodec.encode: frame count F={frames} is not 4k+1 (the VAE compresses time by 4 after "
            f"the first frame); the nearest shorter clip has {4 * ((frames - 1) // 4) + 1} frames"
        )
    if height % STRIDE_S or width % STRIDE_S:
        raise ValueError(f"VideoCodec.encode: height {height} and width {width} must be multiples of 16")
    if not pixels.is_floating_point() or pixels.amin() < -1.001 or pixels.amax() > 1.001:
        raise ValueError(
            "VideoCodec.encode expects float pixels in [-1, 1] (uint8 or [0, 255] input?), "
            f"got {pixels.dtype} in [{pixels.amin().item()}, {pixels.amax().item()}]"
        )
