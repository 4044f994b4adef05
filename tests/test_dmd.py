"""The model-agnostic DMD-2 core (magitrain.flow.dmd) on small tensors and the tiny MagiHumanDiT."""

from __future__ import annotations

import pytest
import torch

from magitrain.flow import flow_grid, sample_distilled
from magitrain.flow.dmd import critic_loss, generator_loss, score_sigmas, simulate
from magitrain.model import MagiHumanDiT, tiny


def test_score_sigmas_are_shifted_uniform_and_clamped():
    g = torch.Generator().manual_seed(0)
    s = score_sigmas(20000, generator=g)
    assert s.dtype == torch.float32 and s.shape == (20000,)
    assert s.min() >= 0.02 and s.max() <= 0.98
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (5 * u / (1 + 4 * u)).clamp(0.02, 0.98).float()
    assert torch.equal(s, want)
    # shift 5 puts most mass at high noise: median of 5u/(1+4u) is 5/6
    assert abs(s.median().item() - 5 / 6) < 0.01
    flat = score_sigmas(20000, generator=torch.Generator().manual_seed(1), shift=1.0, lo=0.0, hi=1.0)
    assert abs(flat.mean().item() - 0.5) < 0.01


def _affine(a: float, b: float):
    """A velocity callable v = a x_t + b (s-dependent only through x_t)."""
    return lambda x, s: {m: a * x[m] + b for m in x}


def test_generator_gradient_equals_a_hand_computation():
    torch.manual_seed(0)
    x0 = {"video": torch.randn(2, 3, 4), "audio": torch.randn(2, 5)}
    eps = {m: torch.randn_like(v) for m, v in x0.items()}
    s = torch.tensor([0.3, 0.8])
    leaf = {m: v.clone().requires_grad_(True) for m, v in x0.items()}
    weights = {"video": 2.0, "audio": 0.5}
    real, fake = _affine(0.7, 0.1), _affine(-0.4, 0.3)
    loss, logs = generator_loss(leaf, real, fake, s=s, eps=eps, weights=weights)
    loss.backward()

    want_loss = 0.0
    for m, x in x0.items():
        grad = torch.zeros_like(x)
        g_all = torch.zeros_like(x)
        gap = 0.0  # the mean |x0 - x0_real| per element, averaged over the samples
        for b in range(2):
            sb = s[b].item()
            xt = (1 - sb) * x[b] + sb * eps[m][b]
            x_real = xt - sb * (0.7 * xt + 0.1)
            x_fake = xt - sb * (-0.4 * xt + 0.3)
            g = (x_fake - x_real) / (x[b] - x_real).abs().mean()
            g_all[b] = g
            gap += (x[b] - x_real).abs().mean() / 2
            grad[b] = weights[m] * g / x.numel()  # d/dx 0.5 mean((x - (x - g))^2) with g constant
        torch.testing.assert_close(leaf[m].grad, grad, rtol=1e-5, atol=1e-7)
        want_m = 0.5 * g_all.pow(2).mean()
        torch.testing.assert_close(logs[f"loss_{m}"], want_m)
        torch.testing.assert_close(logs[f"dmd_grad_{m}"], g_all.pow(2).mean().sqrt())
        torch.testing.assert_close(logs[f"teacher_gap_{m}"], gap)
        want_loss += weights[m] * want_m
    torch.testing.assert_close(loss.detach(), want_loss)


def test_equal_real_and_fake_scores_give_no_gradient():
    x0 = {"x": torch.randn(4, 8, requires_grad=True)}
    eps = {"x": torch.randn(4, 8)}
    loss, _ = generator_loss(x0, _affine(0.5, 0), _affine(0.5, 0), s=torch.full((4,), 0.5), eps=eps)
    loss.backward()
    assert torch.count_nonzero(x0["x"].grad) == 0


def test_critic_loss_is_the_velocity_mse_on_detached_samples():
    torch.manual_seed(1)
    net = torch.nn.Linear(6, 6)
    x0 = {"x": torch.randn(3, 6, requires_grad=True), "y": torch.randn(3, 6, requires_grad=True)}
    eps = {m: torch.randn(3, 6) for m in x0}
    s = torch.tensor([0.1, 0.5, 0.9])
    loss, logs = critic_loss(lambda x, s: {m: net(x[m]) for m in x}, x0, s=s, eps=eps)
    want = 0.0
    for m in x0:
        xt = (1 - s[:, None]) * x0[m].detach() + s[:, None] * eps[m]
        want = want + (net(xt) - (eps[m] - x0[m].detach())).pow(2).mean()
    torch.testing.assert_close(loss, want)
    assert set(logs) == {"loss_x", "loss_y"}
    loss.backward()
    assert x0["x"].grad is None and net.weight.grad is not None  # the samples are detached


def test_float64_models_keep_float64():
    """A float64 network (a toy or a reference computation) gets float64 inputs everywhere and
    float64 results: nothing is rounded through float32 on the way."""
    torch.manual_seed(2)
    net = torch.nn.Linear(6, 6).double()
    f = lambda x, s: {m: net(x[m]) for m in x}  # noqa: E731
    noise = {"x": torch.randn(3, 6, dtype=torch.float64)}
    x0 = simulate(f, noise, [0.9, 0.5], 1, generator=torch.Generator().manual_seed(0))
    assert x0["x"].dtype == torch.float64 and x0["x"].requires_grad
    s, eps = torch.tensor([0.2, 0.5, 0.8]), {"x": torch.randn(3, 6, dtype=torch.float64)}
    loss_c, _ = critic_loss(f, x0, s=s, eps=eps)
    x_t = (1 - s[:, None].double()) * x0["x"].detach() + s[:, None].double() * eps["x"]
    want = (net(x_t) - (eps["x"] - x0["x"].detach())).pow(2).mean()
    assert loss_c.dtype == torch.float64
    torch.testing.assert_close(loss_c, want, rtol=1e-12, atol=0)
    loss_g, _ = generator_loss(x0, f, _affine(0.3, 0.0), s=s, eps=eps)
    assert loss_g.dtype == torch.float64
    loss_g.backward()
    assert net.weight.grad.dtype == torch.float64


class _Recorder(torch.nn.Module):
    """A velocity callable that records, per call, whether grad was on and whether its input had grad."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x, s):
        self.calls.append((torch.is_grad_enabled(), any(v.requires_grad for v in x.values())))
        return {m: self.w * v for m, v in x.items()}


@pytest.mark.parametrize("exit_index", [0, 3, 7])
def test_only_the_exit_step_carries_grad(exit_index):
    student = _Recorder()
    noise = {"video": torch.randn(2, 4), "audio": torch.randn(2, 3)}
    sigmas = flow_grid(8)[1][:-1].tolist()
    out = simulate(student, noise, sigmas, exit_index, generator=torch.Generator().manual_seed(0))
    assert len(student.calls) == exit_index + 1
    assert student.calls[:-1] == [(False, False)] * exit_index
    assert student.calls[-1] == (True, False)  # grad on, but the input itself is a constant
    sum(v.sum() for v in out.values()).backward()
    assert student.w.grad is not None and student.w.grad != 0
    with pytest.raises(ValueError, match="exit_index"):
        simulate(student, noise, sigmas, 8)


def test_full_simulation_equals_the_distilled_sampler():
    torch.manual_seed(0)
    model = MagiHumanDiT(tiny()).eval()
    text = torch.randn(2, 5, model.config.text_in_channels)
    video, audio = torch.randn(2, 48, 3, 4, 6), torch.randn(2, 9, 64)

    def student(x, s):
        v_video, v_audio = model(x["video"], x["audio"], text)
        return {"video": v_video, "audio": v_audio}

    sigmas = flow_grid(8)[1][:-1].tolist()
    with torch.no_grad():
        got = simulate(
            student, {"video": video, "audio": audio}, sigmas, 7, generator=torch.Generator().manual_seed(3)
        )
    want_video, want_audio = sample_distilled(
        model, video, audio, text, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(got["video"], want_video) and torch.equal(got["audio"], want_audio)
