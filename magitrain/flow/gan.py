"""The optional GAN term of DMD-2 (REFERENCE §5), model-agnostic: non-saturating softplus losses on
discriminator logits and an approximate R1 penalty. No Lightning, no network here: the caller
computes the logits (DMD-2: a small head on the critic's features) and passes them in.

Logits are one per sample, `[B]`; every loss is a mean over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def generator_gan_loss(fake: Tensor) -> Tensor:
    """Non-saturating generator loss `mean softplus(-D(fake))` (= -log sigmoid D(fake))."""
    return F.softplus(-fake.float()).mean()


def discriminator_loss(real: Tensor, fake: Tensor) -> Tensor:
    """`mean softplus(-D(real)) + mean softplus(D(fake))`: the logistic loss of telling real
    (label 1) from fake (label 0)."""
    return F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()


def approximate_r1(real: Tensor, perturbed: Tensor, sigma: float) -> Tensor:
    """Finite-difference R1: `mean((D(x + sigma n) - D(x))^2) / sigma^2` over the batch, where
    `perturbed` are the logits of the real inputs moved by `sigma n`, n ~ N(0, I).

    To first order `D(x + sigma n) - D(x) = sigma n . grad_x D(x)`, whose square has expectation
    `sigma^2 |grad_x D(x)|^2`: so this estimates the true R1 `|grad_x D(x)|^2` without a double
    backward (which activation checkpointing and FSDP2 make costly), as in APT (Lin et al. 2025).
    """
    if sigma <= 0:
        raise ValueError(f"the approximate R1 needs sigma > 0, got {sigma}")
    return (perturbed.float() - real.float()).pow(2).mean() / sigma**2
