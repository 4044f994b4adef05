"""The Stable Audio Open VAE (diffusers `AutoencoderOobleck`) at exactly 25 latent frames per second.

The VAE downsamples by 2048, so audio is fed to it at 2048 * 25 = 51,200 Hz ("treated as 51.2 kHz",
REFERENCE.md §6) and one latent frame lines up with one 25 fps video frame.

Alignment rule (tested): a clip of `seconds` gets `N = round(seconds * 25) + 1` latent frames, the
same count as its video frames (`seconds*25 + 1`, e.g. 126 for 5 s). Latent frame i covers samples
[2048 i, 2048 (i+1)) at 51.2 kHz, i.e. [i/25, (i+1)/25) s, the interval that starts at video frame
i. The resampled waveform is zero-padded at the end (or trimmed) to exactly N * 2048 samples.
"""

import torch
import torchaudio.functional as AF
from diffusers import AutoencoderOobleck
from torch import nn

LATENT_RATE = 25
LATENT_CHANNELS = 64
OUTPUT_RATE = 44100


def num_latent_frames(seconds: float) -> int:
    """Latent (and video) frame count of a clip: `seconds * 25 + 1`, rounded to a whole frame."""
    return round(seconds * LATENT_RATE) + 1


class AudioCodec(nn.Module):
    """Frozen Oobleck VAE: waveform <-> `[B, N, 64]` latents at 25 Hz (not normalised)."""

    def __init__(self, vae: AutoencoderOobleck, window_seconds: float = 29.0):
        super().__init__()
        if vae.config.encoder_hidden_size // 2 != LATENT_CHANNELS or vae.hop_length != 2048:
            raise ValueError(
                f"AudioCodec needs the Stable Audio Open layout (64 channels, hop 2048), got "
                f"{vae.config.encoder_hidden_size // 2} channels, hop {vae.hop_length}"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.hop = vae.hop_length
        self.model_rate = self.hop * LATENT_RATE  # 51,200 Hz
        self.window = round(window_seconds * LATENT_RATE)  # latent frames per encoder window

    @torch.no_grad()
    def encode(
        self,
        waveform: torch.Tensor,
        sample_rate: int,
        num_frames: int | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`[B, C, S]` float audio at `sample_rate` -> latents `[B, N, 64]` (float32).

        Mono mix, resample to 51.2 kHz, duplicate to stereo, pad/trim to N * 2048 samples, encode.
        `num_frames` defaults to `num_latent_frames(S / sample_rate)`; pass the video frame count to
        force alignment with a clip whose audio track is a little longer or shorter than its video.
        """
        if waveform.ndim != 3:
            raise ValueError(f"AudioCodec.encode expects waveform [B, C, S], got {tuple(waveform.shape)}")
        if num_frames is None:
            num_frames = num_latent_frames(waveform.shape[-1] / sample_rate)
        x = waveform.float().mean(1, keepdim=True)
        x = AF.resample(x, sample_rate, self.model_rate)
        x = x.expand(-1, self.vae.config.audio_channels, -1)
        x = _pad_or_trim(x, num_frames * self.hop).to(self.vae.device, self.vae.dtype)
        return self._encode_windows(x, num_frames, sample, generator).transpose(1, 2).float()

    def _encode_windows(self, x, num_frames, sample, generator) -> torch.Tensor:
        """Encode in windows of `self.window` frames, 50% overlap, linear cross-fade of the latents."""
        if num_frames <= self.window:
            return self._encode_once(x, sample, generator)
        hop = self.window // 2
        starts = list(range(0, num_frames - self.window, hop)) + [num_frames - self.window]
        total = x.new_zeros(x.shape[0], LATENT_CHANNELS, num_frames, dtype=torch.float32)
        weight = x.new_zeros(num_frames, dtype=torch.float32)
        ramp = torch.arange(1, self.window + 1, device=x.device, dtype=torch.float32)
        fade = torch.minimum(ramp, ramp.flip(0)).clamp(max=hop) / hop  # /\ with a flat top
        for i, start in enumerate(starts):
            chunk = x[..., start * self.hop : (start + self.window) * self.hop]
            z = self._encode_once(chunk, sample, generator)
            w = fade.clone()
            if i == 0:
                w[: self.window // 2] = 1  # no fade-in at the clip start
            if i == len(starts) - 1:
                w[self.window // 2 :] = 1  # no fade-out at the clip end
            total[..., start : start + self.window] += z.float() * w
            weight[start : start + self.window] += w
        return total / weight

    def _encode_once(self, x, sample, generator) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`[B, N, 64]` -> (stereo waveform `[B, 2, N * 1764]` at 44.1 kHz, 44100).

        The VAE returns N * 2048 samples "at 51.2 kHz"; resampling by 441/512 restores real time.
        """
        if latents.ndim != 3 or latents.shape[-1] != LATENT_CHANNELS:
            raise ValueError(f"AudioCodec.decode expects latents [B, N, 64], got {tuple(latents.shape)}")
        z = latents.transpose(1, 2).to(self.vae.device, self.vae.dtype)
        audio = self.vae.decode(z).sample.float()
        return AF.resample(audio, self.model_rate, OUTPUT_RATE).clamp(-1, 1), OUTPUT_RATE


def _pad_or_trim(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))
