"""Distribution matching distillation (DMD-2), model-agnostic: the score timesteps, the student's
backward simulation, and the generator (DMD) and critic (fake-score) losses.

Everything works on *velocity callables* over *dicts of modalities*:
`net(x_t: dict[str, Tensor], s: Tensor[B]) -> dict[str, Tensor]` returns the flow velocity
`eps - x0` of each modality (same keys and shapes), with the conditioning closed over by the
caller. A guided teacher is simply a callable that returns the CFG-combined velocity, so the same
code distils MagiHumanDiT (`{"video", "audio"}`) and a toy MLP (`{"x"}`). No Lightning here.
A modality some samples are given clean (audio-driven video) is the caller's to feed every network
call; the losses take `scored` per modality, the samples whose modality they score.

Interpolant `x_s = (1 - s) x0 + s eps`, so `x0 = x_s - s v` (REFERENCE §2, §5). The s = 1 end
need not be a standard Gaussian: SR distillation's is the released SR source
`a up(lr) + sqrt(1 - a^2) eps` (REFERENCE §3). The losses take it as their `eps`; `simulate` makes
it from its fresh draws through `source`. The score levels' range (`score_sigmas`' lo, hi) is the
caller's: the base stage's [0.02, 0.98], or the range of the stage distilled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import gaussian
from .schedules import shift_sigmas
from .training import interpolate

Velocity = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]
# (modality, N(0, 1) draw) -> the flow's s = 1 end made of it, e.g. the SR source
Source = Callable[[str, Tensor], Tensor]


def _working(*tensors: Tensor) -> torch.dtype:
    """The dtype the losses and the sampler compute in: float32, or float64 for float64 inputs
    (bf16/fp16 callers get float32 arithmetic, a float64 model keeps its precision)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like`, in `like`'s dtype."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _x0(x_t: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """The clean-sample prediction `x_t - s v` (in the working dtype; s is not rounded to x_t's)."""
    x_t = x_t.to(_working(x_t, v))
    return x_t - _per_sample(s, x_t) * v.to(x_t.dtype)


def _mean(x: Tensor, keep: Tensor | None) -> Tensor:
    """The mean of x over every element, or over the samples where `keep` [B] is true (each sample
    weighing as its own mean: all kept, the same number)."""
    if keep is None:
        return x.mean()
    keep = keep.to(x.device, x.dtype)
    return (x.flatten(1).mean(1) * keep).sum() / keep.sum().clamp_min(1)


def _mse(x: Tensor, target: Tensor, keep: Tensor | None) -> Tensor:
    return F.mse_loss(x, target) if keep is None else _mean((x - target).pow(2), keep)


def _noised(x0: dict[str, Tensor], s: Tensor, eps: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for m, x in x0.items():
        x = x.detach().to(_working(x))
        out[m] = interpolate(x, eps[m].to(x.device, x.dtype), s)
    return out


def _fresh(like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """N(0, 1) shaped like `like`, from one generator or one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return gaussian(tuple(like.shape), generator, like.device)
    return torch.stack([gaussian(tuple(like.shape[1:]), g, like.device) for g in generator])


def _end(modality: str, draw: Tensor, source: Source | None) -> Tensor:
    return draw if source is None else source(modality, draw)


def score_sigmas(
    n: int,
    *,
    generator: torch.Generator | None = None,
    shift: float = 5.0,
    lo: float = 0.02,
    hi: float = 0.98,
    device: torch.device | str | None = None,
) -> Tensor:
    """n noise levels for the score networks: u ~ U(0, 1), shifted `k u / (1 + (k - 1) u)`, clamped
    to [lo, hi]. float32, drawn on the generator's device (so a seed means the same values
    anywhere), returned on `device` (default: that device)."""
    draw_on = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(n, generator=generator, device=draw_on, dtype=torch.float64)
    s = shift_sigmas(u, shift).clamp(lo, hi).float()
    return s.to(device) if device is not None else s


def simulate(
    student: Velocity,
    noise: dict[str, Tensor],
    sigmas: Sequence[float],
    exit_index: int,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    source: Source | None = None,
) -> dict[str, Tensor]:
    """Backward simulation: the student's own few-step sampler from `noise` at `sigmas[0]`, stopped
    at step `exit_index`, whose x0 prediction is returned.

    Steps before the exit predict x0 and re-noise it to the next sigma with fresh noise (drawn per
    modality in the dict's order, as `sample_distilled` draws video before audio), without grad.
    The exit step's student call carries grad when the caller enables it. At
    `exit_index = len(sigmas) - 1` under no_grad this is the distilled sampler with the same noise
    (`sigmas` without the final 0, e.g. the 8 levels of `flow_grid(8)[1][:-1]`).

    `generator` may also be one generator per sample: each sample's noise then comes from its own
    (so a sample's draws do not depend on which other samples share its batch or rank).
    `source` turns each fresh draw into the flow's s = 1 end (default: the draw itself, a Gaussian);
    `noise` is then that end already (e.g. the SR source made of the first draw).
    """
    if not 0 <= exit_index < len(sigmas):
        raise ValueError(f"exit_index must be in [0, {len(sigmas)}), got {exit_index}")
    x = dict(noise)
    batch = next(iter(x.values())).shape[0]
    device = next(iter(x.values())).device

    def level(i: int) -> Tensor:
        return torch.full((batch,), float(sigmas[i]), device=device)

    with torch.no_grad():
        for i in range(exit_index):
            s, s_next = level(i), float(sigmas[i + 1])
            v = student(x, s)
            x = {
                m: s_next * _end(m, _fresh(x[m], generator), source) + (1 - s_next) * _x0(x[m], s, v[m])
                for m in x
            }
    s = level(exit_index)
    v = student(x, s)
    return {m: _x0(x[m], s, v[m]) for m in x}


def generator_loss(
    x0: dict[str, Tensor],
    real: Velocity,
    fake: Velocity,
    *,
    s: Tensor,
    eps: dict[str, Tensor],
    weights: dict | None = None,
    scored: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict]:
    """The DMD loss of the student's samples `x0` (with grad): noise them to `s` with `eps`, ask the
    real (teacher, guided) and fake (critic) scores for x0 predictions without grad, and per
    modality pull x0 along `-g`, `g = (x0_fake - x0_real) / mean_per_sample|x0 - x0_real|`, through
    `loss_m = 0.5 mse(x0, stopgrad(x0 - g))` (whose gradient is g / numel).

    Returns the weighted sum (weights default 1) and logs per modality: `loss_{m}`,
    `dmd_grad_{m}`, the root-mean-square of g, and `teacher_gap_{m}`, the mean |x0 - x0_real| per
    element: how far the student's samples are from the teacher's denoising of them (a student
    that drifts off the teacher's data shows here first, at no extra cost).

    `scored` {modality: [B] bool} (default: every sample): the samples whose modality is pulled and
    logged, e.g. not the audio the caller gave clean (its g, from x0 formulas applied to a clean
    input, means nothing there); the loss is their mean.
    """
    weights, scored = weights or {}, scored or {}
    with torch.no_grad():
        x_t = _noised(x0, s, eps)
        v_real, v_fake = real(x_t, s), fake(x_t, s)
    total, logs = 0.0, {}
    for m, x in x0.items():
        x = x.to(_working(x))
        with torch.no_grad():
            x0_real, x0_fake = _x0(x_t[m], s, v_real[m]), _x0(x_t[m], s, v_fake[m])
            dims = tuple(range(1, x.ndim))
            normaliser = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)
            g = (x0_fake - x0_real) / normaliser
        keep = scored.get(m)
        loss = 0.5 * _mse(x, (x - g).detach(), keep)
        total = total + weights.get(m, 1.0) * loss
        logs[f"loss_{m}"] = loss.detach()
        logs[f"dmd_grad_{m}"] = _mean(g.pow(2), keep).sqrt()
        logs[f"teacher_gap_{m}"] = _mean(normaliser, keep)
    return total, logs


def critic_loss(
    critic: Velocity,
    x0: dict[str, Tensor],
    *,
    s: Tensor,
    eps: dict[str, Tensor],
    scored: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict]:
    """Flow-matching velocity MSE of the fake-score critic on the detached student samples `x0`
    noised to `s` with `eps`, summed over modalities; logs `loss_{m}` per modality. `scored` as in
    `generator_loss`: a modality given clean is no velocity to learn."""
    scored = scored or {}
    x_t = _noised(x0, s, eps)
    v = critic(x_t, s)
    total, logs = 0.0, {}
    for m in x0:
        target = eps[m].to(x_t[m].device, x_t[m].dtype) - x0[m].detach().to(x_t[m].dtype)
        loss = _mse(v[m].to(x_t[m].dtype), target, scored.get(m))
        total = total + loss
        logs[f"loss_{m}"] = loss.detach()
    return total, logs
