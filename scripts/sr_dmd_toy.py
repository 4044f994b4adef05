"""SR distillation's acceptance toy: the DMD-2 core (`magitrain.flow.dmd`) with the SR stage's source,
as recipe=sr_dmd2_* runs it, distils a 5-step conditional refinement teacher into 2-step and 1-step
students; two negative controls (a flipped DMD gradient, a frozen critic) must fail.

The toy (a 1-D signal of DIM samples in BLOCK-sample blocks): the target is a coarse part, one
level per block, plus a detail pattern that every block average removes: +-RADIUS times one of two
zero-mean patterns, the pattern chosen by the sign of the first coarse level (a conditional,
bimodal detail), with small noise. The "LR" is the block average (the blur); the flow's s = 1 end
is the released SR source `a blur(x) + sqrt(1 - a^2) eps`, a = 0.8389 (DDPM index 220), and the
flow `x_s = (1 - s) x + s source`, as SR fine-tuning trains it. The networks are timestep-free MLPs
of x_s alone, as MagiHuman reads the noise level from its input, and see the LR only through the
source, as the SR model does.

- teacher: flow matching on that flow (s: SR fine-tuning's mix of the 5-step grid and the shifted
  logit-normal), sampled with the released SR sampler (5 UniPC steps, shift 5); the same teacher
  at 2 steps is the baseline the student must clearly beat;
- students: `dmd.simulate` from the source on `flow_grid(steps)` re-noising towards a fresh source,
  generator and critic losses with the source as their noise end, score levels `score_sigmas` in
  [SCORE_LO, SCORE_HI] of the SR flow's time, TTUR 5, EMA 0.99, the recipe's rates scaled for
  the toy;
- quality: the share of samples whose block averages are within COARSE_TOL of the condition's and
  whose detail lies within IN_MODE of one of the two modes of the condition's pattern.

Pass: the 2-step student within 0.10 of the 5-step teacher and at least MARGIN above the teacher
at 2 UniPC steps; the 1-step student is measured against the same criteria (reported, not
required). Controls (`--control-steps`, 200: a frozen critic gives g = 0 exactly, so the student
stays the teacher sampled with its 2-step sampler at any length; a flipped sign has walked away
from the data by then) must fail them.

    python scripts/sr_dmd_toy.py [--steps 600] [--control-steps 200] [--seed 0] [--json OUT.json]

docs/benchmarks.md ("SR distillation toy") has the figures; tests/test_sr_dmd_toy.py runs it shortened.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from magitrain.flow import flow_grid, sr_renoise_coefficient, unipc_scheduler
from magitrain.flow.dmd import critic_loss, generator_loss, score_sigmas, simulate
from magitrain.flow.sr import vp_renoise
from magitrain.flow.training import SigmaSampling, sample_sigmas

DIM, BLOCK = 64, 16
BLOCKS = DIM // BLOCK
RADIUS, MODE_STD, OFF_STD = 6.0, 0.3, 0.02
COARSE_STD = 1.0
IN_MODE, COARSE_TOL = 4 * MODE_STD, 0.3
A = float(sr_renoise_coefficient(220))  # 0.8389, the released source's signal
# the score levels: uniform (shift 1) over the SR flow's own range (s = 1: the source), as
# recipes/sr_dmd2_*.yaml draw them (shift 5 puts most levels near the source, where x_t tells little
# of the detail: the 1-step student, 400 steps without EMA, 0.344 at shift 5, 0.487 at shift 1)
SCORE_SHIFT, SCORE_LO, SCORE_HI = 1.0, 0.02, 1.0
MARGIN = 0.20  # "clearly above": how far a student must beat the teacher at its step count
EVAL_N = 2048


def patterns() -> torch.Tensor:
    """[2, DIM]: two unit, orthogonal detail patterns with zero mean in every block."""
    g = torch.Generator().manual_seed(1234)
    raw = torch.randn(2, BLOCKS, BLOCK, generator=g, dtype=torch.float64)
    raw = raw - raw.mean(-1, keepdim=True)
    q, _ = torch.linalg.qr(raw.reshape(2, DIM).T)
    return q.T.float()


PATTERNS = patterns()


def blur(x: torch.Tensor) -> torch.Tensor:
    """The block average, repeated over its block (the LR, at the target's size: `up(lr)`)."""
    return x.reshape(-1, BLOCKS, BLOCK).mean(-1, keepdim=True).expand(-1, BLOCKS, BLOCK).reshape(-1, DIM)


def sample_data(n: int, g: torch.Generator) -> torch.Tensor:
    coarse = COARSE_STD * torch.randn(n, BLOCKS, generator=g)
    pattern = PATTERNS[(coarse[:, 0] > 0).long()]
    side = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    detail = side * RADIUS * pattern + MODE_STD * torch.randn(n, 1, generator=g) * pattern
    x = coarse.repeat_interleave(BLOCK, 1) + detail + OFF_STD * torch.randn(n, DIM, generator=g)
    return x


def source(lr_up: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return vp_renoise(lr_up, torch.tensor(A), eps)


class MLP(nn.Module):
    """A timestep-free denoiser: velocity from x_s alone."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(DIM, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, DIM),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def velocity(net: MLP):
    return lambda x, s: {"x": net(x["x"])}


def train_teacher(steps: int = 1500, batch: int = 256, seed: int = 0, lr: float = 2e-3) -> MLP:
    """Flow matching from the SR source to the target, s as SR fine-tuning draws it (half on the
    5-step grid, half shifted logit-normal, shift 5)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    grid = flow_grid(5)[1][:-1]
    sampling = SigmaSampling(base_shift=5.0, max_shift=5.0)
    for _ in range(steps):
        x0 = sample_data(batch, g)
        x1 = source(blur(x0), torch.randn(batch, DIM, generator=g))
        s = sample_sigmas(batch, 1, generator=g, sampling=sampling)
        on_grid = torch.rand(batch, generator=g) < 0.5
        s = torch.where(on_grid, grid[torch.randint(0, len(grid), (batch,), generator=g)], s).reshape(-1, 1)
        loss = (net((1 - s) * x0 + s * x1) - (x1 - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.requires_grad_(False).eval()


@torch.no_grad()
def teacher_sample(net: MLP, lr_up: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    """The released SR sampler: UniPC (shift 5) from the source."""
    x = source(lr_up, torch.randn(lr_up.shape, generator=g))
    solver = unipc_scheduler(steps)
    for t in solver.timesteps:
        x = solver.step(net(x), t, x).prev_sample
    return x


@torch.no_grad()
def student_sample(net: MLP, lr_up: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    """The distilled SR sampler (`sample_super_resolution(sampler="distilled")`'s loop)."""
    noise = {"x": source(lr_up, torch.randn(lr_up.shape, generator=g))}
    sigmas = flow_grid(steps)[1][:-1].tolist()
    return simulate(
        velocity(net), noise, sigmas, steps - 1, generator=g, source=lambda m, e: source(lr_up, e)
    )["x"]


def quality(x: torch.Tensor, condition: torch.Tensor) -> float:
    """Share of samples with the condition's block averages and a detail in a mode of the
    condition's pattern: its coefficient along that pattern within IN_MODE of +-RADIUS, along the
    other pattern within IN_MODE of 0."""
    coarse_ok = (blur(x) - blur(condition)).pow(2).mean(1).sqrt() < COARSE_TOL
    which = (condition.reshape(-1, BLOCKS, BLOCK)[:, 0].mean(1) > 0).long()
    coefficients = (x - blur(x)) @ PATTERNS.T  # [N, 2]
    own = coefficients.gather(1, which[:, None])[:, 0]
    other = coefficients.gather(1, 1 - which[:, None])[:, 0]
    in_mode = ((own.abs() - RADIUS).abs() < IN_MODE) & (other.abs() < IN_MODE)
    return float((coarse_ok & in_mode).float().mean())


def eval_conditions() -> torch.Tensor:
    return blur(sample_data(EVAL_N, torch.Generator().manual_seed(99)))


def distill(
    teacher: MLP,
    *,
    steps: int,
    student_steps: int = 2,
    ttur: int = 5,
    batch: int = 128,
    sign: float = 1.0,
    train_critic: bool = True,
    lr: float = 1e-3,
    critic_lr: float = 3e-3,
    ema_start: int = 100,
    seed: int = 0,
) -> MLP:
    """DMD-2 of the SR stage with the core; returns the EMA student (0.99 from `ema_start`)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student, critic = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt_g = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    sigmas = flow_grid(student_steps)[1][:-1].tolist()

    def draw():
        lr_up = blur(sample_data(batch, g))
        end = lambda m, e: source(lr_up, e)  # noqa: E731  (the core's Source)
        noise = {"x": end("x", torch.randn(batch, DIM, generator=g))}
        exit_index = int(torch.randint(0, student_steps, (1,), generator=g))
        x0 = simulate(velocity(student), noise, sigmas, exit_index, generator=g, source=end)
        s = score_sigmas(batch, generator=g, shift=SCORE_SHIFT, lo=SCORE_LO, hi=SCORE_HI)
        return x0, s, {"x": end("x", torch.randn(batch, DIM, generator=g))}

    for step in range(steps):
        for _ in range(ttur if train_critic else 0):
            with torch.no_grad():
                x0, s, eps = draw()
            loss, _ = critic_loss(velocity(critic), x0, s=s, eps=eps)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 10.0)
            opt_c.step()
        x0, s, eps = draw()
        loss, _ = generator_loss(x0, velocity(teacher), velocity(critic), s=s, eps=eps, weights={"x": sign})
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
        opt_g.step()
        with torch.no_grad():
            decay = 0.99 if step >= ema_start else 0.0
            for e, p in zip(ema.parameters(), student.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
    return ema.eval()


@dataclass
class Result:
    teacher_5: float
    teacher_2: float
    teacher_1: float
    student_2: float
    student_1: float
    flipped_2: float
    frozen_critic_2: float
    seconds: float


def fails(student: float, teacher_full: float, teacher_same_steps: float) -> list[str]:
    """The acceptance criteria a student misses (empty: it passes)."""
    failed = []
    if abs(student - teacher_full) > 0.10:
        failed.append(f"quality {student:.3f} not within 0.10 of the 5-step teacher's {teacher_full:.3f}")
    if student < teacher_same_steps + MARGIN:
        failed.append(
            f"quality {student:.3f} not {MARGIN} above the teacher at its steps ({teacher_same_steps:.3f})"
        )
    return failed


def run(steps: int, seed: int = 0, teacher_steps: int = 3000, controls_steps: int | None = None) -> Result:
    start = time.perf_counter()
    teacher = train_teacher(teacher_steps, seed=seed)
    cond = eval_conditions()

    def q_teacher(n):
        return quality(teacher_sample(teacher, cond, n, torch.Generator().manual_seed(7)), cond)

    def q_student(net, n):
        return quality(student_sample(net, cond, n, torch.Generator().manual_seed(7)), cond)

    control = controls_steps or steps
    result = Result(
        teacher_5=q_teacher(5),
        teacher_2=q_teacher(2),
        teacher_1=q_teacher(1),
        student_2=q_student(distill(teacher, steps=steps, seed=seed), 2),
        student_1=q_student(distill(teacher, steps=steps, student_steps=1, seed=seed), 1),
        flipped_2=q_student(distill(teacher, steps=control, sign=-1.0, seed=seed), 2),
        frozen_critic_2=q_student(distill(teacher, steps=control, train_critic=False, seed=seed), 2),
        seconds=0.0,
    )
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="generator steps of each student")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--control-steps", type=int, default=200, help="generator steps of each control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.steps, args.seed, args.teacher_steps, args.control_steps)
    verdicts = {
        "student_2": fails(result.student_2, result.teacher_5, result.teacher_2),
        "student_1 (reported)": fails(result.student_1, result.teacher_5, result.teacher_1),
        "flipped_2 (must fail)": fails(result.flipped_2, result.teacher_5, result.teacher_2),
        "frozen_critic_2 (must fail)": fails(result.frozen_critic_2, result.teacher_5, result.teacher_2),
    }
    print(json.dumps(asdict(result), indent=2))
    for name, failed in verdicts.items():
        print(f"{name}: {'FAIL ' + '; '.join(failed) if failed else 'pass'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(result), "fails": verdicts}, f, indent=2)
    ok = not verdicts["student_2"] and all(verdicts[k] for k in verdicts if "must fail" in k)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
