"""Noise-level grids of the released samplers (REFERENCE §2-3), computed the way the released code does.

Flow matching uses `x_s = (1 - s) x0 + s eps` with s in [0, 1]. Inference grids start from
`s = linspace(SIGMA_MAX, 0, n + 1)[:-1]`, apply the shift `s' = k s / (1 + (k - 1) s)` and use
the timestep `int(1000 s')`. SIGMA_MAX is 0.999 rounded to float32 (the first entry of the released
scheduler's float32 training table): with the exact 0.999 three sigmas differ by one float32 ulp.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # 0.9990000128746033
DEFAULT_SHIFT = 5.0


def shift_sigmas(s, shift):
    """The flow-matching time shift `k s / (1 + (k - 1) s)` (k > 1: more steps at high noise), for
    floats, NumPy arrays or tensors."""
    return shift * s / (1 + (shift - 1) * s)


def unshifted_sigmas(steps: int) -> np.ndarray:
    """`linspace(SIGMA_MAX, 0, steps + 1)[:-1]` (float64), as diffusers' `set_timesteps(sigmas=)` wants."""
    return np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]


def flow_grid(steps: int, shift: float = DEFAULT_SHIFT) -> tuple[Tensor, Tensor]:
    """(timesteps int64 [steps], sigmas float32 [steps + 1], last 0) of an n-step inference grid.

    steps 8 (distilled): t = [999, 972, 937, 892, 833, 749, 624, 416]; 5 (SR): [999, 952, 882, 768, 555].
    """
    s = shift_sigmas(unshifted_sigmas(steps), shift)  # float64, like the released NumPy code
    timesteps = torch.from_numpy((s * NUM_TRAIN_TIMESTEPS).astype(np.int64))  # truncates
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def zero_snr_alphas_sqrt(
    num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """sqrt(alpha_bar) [num_timesteps] of a DDPM table rescaled to zero terminal SNR, float32.

    Scaled-linear betas (`linspace(sqrt(b0), sqrt(b1))**2`), then sqrt(alpha_bar) is shifted and
    scaled so that its last entry is 0 and its first is unchanged (Lin et al. 2024, Alg. 1).
    Index i is DDPM timestep i: 0.99957 at i = 0 down to 0 at the end.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_bar = np.cumprod((1.0 - betas).numpy())
    a = torch.tensor(alphas_bar, dtype=torch.float32).sqrt()
    a_first, a_last = a[0].clone(), a[-1].clone()
    return (a - a_last) * (a_first / (a_first - a_last))


def sr_renoise_coefficient(noise_value: int = 220) -> Tensor:
    """The SR stage's signal coefficient a = sqrt(alpha_bar) at DDPM step `noise_value` (0.8389 at 220).

    The re-noised latent is `a x + sqrt(1 - a^2) eps` (variance preserving). Returns a float32 scalar.
    """
    return zero_snr_alphas_sqrt()[noise_value]
