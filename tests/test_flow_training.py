"""Training-side flow-matching primitives: interpolant, noise-level sampling, masked loss, statistics."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from magitrain.flow import (
    SigmaSampling,
    first_frame_mask,
    interpolate,
    sample_sigmas,
    sigma_bucket_stats,
    velocity_mse,
    velocity_target,
)


def _pair(shape=(3, 48, 4, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_interpolant_ends_and_velocity():
    x0, eps = _pair()
    sigma = torch.tensor([0.0, 0.3, 1.0])
    x = interpolate(x0, eps, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], eps[2])
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x[1] - 0.3 * v[1], x0[1])  # x0 = x_s - s v
    h = 1e-3  # the target is the derivative of the path in s
    dx = (interpolate(x0, eps, sigma + h) - interpolate(x0, eps, sigma - h)) / (2 * h)
    torch.testing.assert_close(dx, v, atol=1e-3, rtol=0)


def test_shift_grows_with_tokens_and_saturates():
    cfg = SigmaSampling()
    k = cfg.shift(torch.tensor([0, 256, 1983, 3710, 65280]))
    assert k[0] == k[1] == pytest.approx(1.0) and k[3] == k[4] == pytest.approx(5.0)
    assert k[2] == pytest.approx(math.sqrt(5.0))  # log-linear: half way in tokens, half way in log k


def test_sigmas_are_logit_normal_then_shifted():
    n = 20000
    plain = SigmaSampling(uniform_fraction=0.0)
    s = sample_sigmas(n, 256, torch.Generator().manual_seed(1), plain)  # shift 1 at base_tokens
    assert s.shape == (n,) and s.dtype == torch.float32
    logit = torch.logit(s.double())
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    shifted = sample_sigmas(n, 10_000, torch.Generator().manual_seed(1), plain)  # shift 5
    assert shifted.median().item() == pytest.approx(5 / 6, abs=0.01)  # k u / (1 + (k-1) u) at u = 1/2
    assert (shifted > s).all()


def test_uniform_mix_and_reproducibility():
    n = 20000
    uniform = sample_sigmas(n, 256, torch.Generator().manual_seed(2), SigmaSampling(uniform_fraction=1.0))
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.var().item() == pytest.approx(1 / 12, abs=0.003)
    a = sample_sigmas(8, 1000, torch.Generator().manual_seed(3))
    b = sample_sigmas(8, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and ((a >= 0) & (a <= 1)).all()


def test_per_sample_token_counts():
    counts = torch.tensor([256, 3710])
    s = sample_sigmas(2, counts, torch.Generator().manual_seed(4), SigmaSampling(uniform_fraction=0.0))
    g = torch.Generator().manual_seed(4)
    u = torch.sigmoid(torch.randn(2, generator=g, dtype=torch.float64))
    torch.testing.assert_close(s, torch.stack([u[0], 5 * u[1] / (1 + 4 * u[1])]).float())


def test_velocity_mse_unmasked_is_per_sample_mse():
    pred, target = _pair()
    expected = torch.stack([F.mse_loss(p, t) for p, t in zip(pred, target, strict=True)])
    torch.testing.assert_close(velocity_mse(pred, target), expected)
    torch.testing.assert_close(velocity_mse(pred, target, torch.ones(3, 1, 4, 1, 1)), expected)


def test_first_frame_mask_excludes_the_reference_frame():
    pred, target = _pair()
    mask = first_frame_mask(pred, torch.tensor([True, False, True]))
    assert mask.shape == (3, 1, 4, 1, 1)
    assert mask[:, 0, 0].flatten().tolist() == [0.0, 1.0, 0.0] and (mask[:, :, 1:] == 1).all()
    loss = velocity_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, :, 0] += 10.0  # frame 0 of the conditioned samples no longer counts
    loss_changed = velocity_mse(changed, target, mask)
    assert torch.equal(loss[[0, 2]], loss_changed[[0, 2]]) and loss_changed[1] > loss[1]
    torch.testing.assert_close(loss[0], F.mse_loss(pred[0, :, 1:], target[0, :, 1:]))


def test_sigma_bucket_stats():
    sigma = torch.tensor([0.05, 0.15, 0.12, 0.99, 1.0])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    sums, counts = sigma_bucket_stats(sigma, loss, num_buckets=4)
    assert sums.tolist() == [6.0, 0.0, 0.0, 9.0] and counts.tolist() == [3.0, 0.0, 0.0, 2.0]


def test_flow_does_not_import_lightning():
    code = "import sys, magitrain.flow; assert not {'lightning', 'pytorch_lightning'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
