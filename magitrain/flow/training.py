"""Training-side flow matching: the interpolant, the noise-level distribution and the velocity loss.

`x_s = (1 - s) x0 + s eps`, target velocity `v = eps - x0` (so `x0 = x_s - s v`), one s per sample
shared by its video and audio (unless a recipe draws them apart, or gives one modality clean: s = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedules import shift_sigmas


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like`."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_s = (1 - s) x0 + s eps, with sigma [B] one noise level per sample."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The model's regression target `eps - x0` (the time derivative of the interpolant)."""
    return eps - x0


@dataclass(frozen=True)
class SigmaSampling:
    """Logit-normal noise levels with a token-count-dependent shift and a small uniform mix.

    u ~ sigmoid(N(mean, std)), replaced by U(0, 1) with probability `uniform_fraction` (keeps
    both ends of [0, 1] trained), then `s = k u / (1 + (k - 1) u)`. The shift k grows with the
    number of noised tokens n (video + audio) as in Flux: log k is linear in n between
    (base_tokens, log base_shift) and (max_tokens, log max_shift), held constant outside. The
    default top end is the 5-second 256p base clip (3584 video + 126 audio tokens), which the
    released sampler runs with shift 5; larger inputs keep 5, as the released SR sampler does.
    """

    mean: float = 0.0
    std: float = 1.0
    uniform_fraction: float = 0.05
    base_shift: float = 1.0
    max_shift: float = 5.0
    base_tokens: int = 256
    max_tokens: int = 3710

    def shift(self, num_tokens: Tensor) -> Tensor:
        """The shift k for each token count in `num_tokens` (float64, same shape)."""
        frac = (num_tokens.double() - self.base_tokens) / (self.max_tokens - self.base_tokens)
        log_k = math.log(self.base_shift) + frac.clamp(0, 1) * math.log(self.max_shift / self.base_shift)
        return log_k.exp()


def sample_sigmas(
    batch: int,
    num_tokens: int | Tensor,
    generator: torch.Generator | None = None,
    sampling: SigmaSampling | None = None,
) -> Tensor:
    """One noise level s in [0, 1] per sample: float32 [batch], on the generator's device (CPU without one).

    `num_tokens` is the number of noised tokens, one int for the batch or a [batch] tensor.
    """
    sampling = sampling or SigmaSampling()
    device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    u = torch.sigmoid(sampling.mean + sampling.std * z)
    uniform = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    use_uniform = torch.rand(batch, generator=generator, device=device) < sampling.uniform_fraction
    u = torch.where(use_uniform, uniform, u)
    if isinstance(num_tokens, Tensor):
        k = sampling.shift(num_tokens.to(device).expand(batch))
    else:  # a fill on the device: no host-to-device copy (and wait) per call
        k = torch.full(
            (batch,),
            float(sampling.shift(torch.tensor(float(num_tokens)))),
            device=device,
            dtype=torch.float64,
        )
    return shift_sigmas(u, k).float()


@dataclass(frozen=True)
class Conditioning:
    """Per-sample probabilities of training with one modality given clean (s = 0) as an input:
    audio-driven video (`p_a2v`: the clean audio drives, the video is noised and trained) and
    video-to-audio (`p_v2a`). A sample is one, the other or neither. A clip without audio is never
    either: its silent audio would drive the video in a2v, and in v2a nothing of it is trained."""

    p_a2v: float = 0.0
    p_v2a: float = 0.0

    def __post_init__(self):
        if min(self.p_a2v, self.p_v2a) < 0 or self.p_a2v + self.p_v2a > 1:
            raise ValueError(
                f"conditioning needs p_a2v, p_v2a >= 0 and p_a2v + p_v2a <= 1, got {self.p_a2v}, {self.p_v2a}"
            )

    @property
    def enabled(self) -> bool:
        return self.p_a2v > 0 or self.p_v2a > 0

    def draw(self, u: Tensor, has_audio: Tensor) -> tuple[Tensor, Tensor]:
        """(a2v, v2a) bool [B] from one uniform u [B] per sample and the clips' `has_audio` [B]."""
        has_audio = has_audio.to(u.device).bool()
        a2v = (u < self.p_a2v) & has_audio
        v2a = (u >= self.p_a2v) & (u < self.p_a2v + self.p_v2a) & has_audio
        return a2v, v2a


def first_frame_mask(video: Tensor, image_conditioned: Tensor) -> Tensor:
    """[B, 1, T, 1, 1] float mask for video [B, C, T, H, W]: 0 on frame 0 of image-conditioned samples.

    Frame 0 of those samples is the clean reference latent, not noise: it is excluded from the loss,
    and `torch.where(mask == 0, x0, x_s)` puts the clean frame into the model input.
    """
    mask = torch.ones(video.shape[0], 1, video.shape[2], 1, 1, device=video.device)
    mask[:, 0, 0] = (~image_conditioned.bool()).float().reshape(-1, 1, 1).to(video.device)
    return mask


def velocity_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error [B] in float32, over the elements where `mask` (broadcastable
    to pred) is 1. Average it over the batch for the loss; use one call per modality."""
    se = (pred.float() - target.float()).pow(2)
    if mask is None:
        return se.flatten(1).mean(1)
    mask = mask.to(se.dtype).expand_as(se)
    return (se * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def sigma_bucket_stats(sigma: Tensor, loss: Tensor, num_buckets: int = 10) -> tuple[Tensor, Tensor]:
    """Loss sums and sample counts [num_buckets] over equal-width buckets of s in [0, 1].

    Sums and counts (not means) so that they can be all-reduced across ranks and accumulated over
    steps before logging `sums / counts`.
    """
    bucket = (sigma.float() * num_buckets).long().clamp(0, num_buckets - 1)
    bucket = bucket.to(loss.device)
    sums = torch.zeros(num_buckets, device=loss.device).index_add_(0, bucket, loss.detach().float())
    counts = torch.bincount(bucket, minlength=num_buckets).to(loss.device, torch.float32)
    return sums, counts
