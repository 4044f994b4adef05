"""The DMD toy of tests/test_dmd_toy.py and tests/test_dmd_toy_controls.py: proof that
magitrain.flow.dmd distils, not just runs. A timestep-free MLP teacher, trained by flow matching on a
conditional toy distribution, is distilled by the same core the recipe uses to a 2-step student
that matches the 64-step teacher and beats the 2-step teacher. Two negative controls (a flipped DMD
gradient, a frozen critic) must fail the same criteria (see the controls' file for their lengths).

The toy: 2 classes in 64 dims, each a pair of antipodal Gaussian modes (+mu_c, -mu_c) in an 8-dim
subspace (so classifier-free guidance favours neither mode), with small noise off the subspace:
the empty directions let a timestep-free denoiser read the noise level.

Everything runs at the released defaults and the issue's hyper-parameters: the student's grid is
`flow_grid(2)` (shift 5: s = 0.9998, 0.833), the score noise levels are `score_sigmas` with its
defaults (shift 5, clamped to [0.02, 0.98]), generator lr 2e-4, critic lr 2e-3, betas (0, 0.999),
batch 256, TTUR 5, EMA 0.99, 1000 generator steps.

Why the data is large (RADIUS 12, mode std 1): shift k multiplies the noise-to-signal ratio,
`s'/(1-s') = k s/(1-s)`, so shift-k noise levels on data scaled by c see exactly what shift k/c
sees on the unscaled data (x_t differs by a per-s factor only). Shift 5 suits the released
3710-token latents; a one-token toy at unit scale is the regime where the project's own
`SigmaSampling` uses shift 1. On the same toy at a quarter of this scale (radius 3, mode std 0.25,
the first version of this test) the fine structure that the in-mode rate measures (the mode width)
is only visible below s ~ 0.2, which shift-5 levels reach for ~5% of draws; measured there (seed 0,
1000 steps, EMA in-mode rate; 64-step teacher 0.84, 2-step teacher 0.41, pass needs >= 0.74):
  - student grid shift 5 (s = 0.9998, 0.833), score shift 5: 0.36 (stalls: its second step sees
    almost no signal),
  - student grid shift 1 (s = 0.999, 0.4995), score shift 5: 0.57 (0.70 after 3000 steps),
    score shift 5 for the generator loss and 1 for the critic: 0.68, 1 and 5: 0.79, 1 and 1: 0.81.
Scaled x4 the defaults give 0.91 (distillation seed 1: 0.91 too; 64-step teacher 0.89, 2-step
teacher 0.53). Other scales with the defaults: x2 0.69 (64-step teacher 0.87: not within 0.10),
x3 0.76 (a weaker 64-step teacher, 0.68: passes), x5 0.91 (the 2-step teacher's samples collapse
onto the mode centres, in-mode 0.62: misses the 0.30 margin by 0.003).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

from magitrain.flow import flow_grid
from magitrain.flow.dmd import critic_loss, generator_loss, score_sigmas, simulate

DIM, SUB, CLASSES = 64, 8, 2
RADIUS, MODE_STD, OFF_STD = 12.0, 1.0, 0.08  # large enough for shift 5 (module docstring)
IN_MODE = 4.0 * MODE_STD  # subspace distance to a mode centre counted as "in the mode" (~95% of true samples)
NULL = CLASSES  # the class index of the unconditional (dropped) label


def mode_centres() -> torch.Tensor:
    """[CLASSES, 2, DIM]: +mu_c and -mu_c, mu_0 orthogonal to mu_1, all in the first SUB dims."""
    g = torch.Generator().manual_seed(1234)
    basis, _ = torch.linalg.qr(torch.randn(SUB, SUB, generator=g, dtype=torch.float64))
    centres = torch.zeros(CLASSES, 2, DIM)
    for c in range(CLASSES):
        mu = RADIUS * basis[:, c].float()
        centres[c, 0, :SUB], centres[c, 1, :SUB] = mu, -mu
    return centres


CENTRES = mode_centres()


def sample_data(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = labels.shape[0]
    side = torch.randint(0, 2, (n,), generator=g)
    x = CENTRES[labels, side].clone()
    x[:, :SUB] += MODE_STD * torch.randn(n, SUB, generator=g)
    x[:, SUB:] += OFF_STD * torch.randn(n, DIM - SUB, generator=g)
    return x


class MLP(nn.Module):
    """A timestep-free conditional denoiser: velocity from (x_t, class) only."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.embed = nn.Embedding(CLASSES + 1, width)
        self.inp = nn.Linear(DIM, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, DIM))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.inp(x) + self.embed(labels)))


def velocity(net: MLP, labels: torch.Tensor):
    """The DMD core's velocity callable for one modality "x", conditioning closed over."""
    return lambda x, s: {"x": net(x["x"], labels)}


def guided(net: MLP, labels: torch.Tensor, scale: float):
    """Standard-form CFG `u + g (c - u)` (g = 1: the conditional velocity, one pass)."""
    if scale == 1.0:
        return velocity(net, labels)
    null = torch.full_like(labels, NULL)

    def v(x, s):
        c, u = net(x["x"], labels), net(x["x"], null)
        return {"x": u + scale * (c - u)}

    return v


def train_teacher(
    steps: int = 2000, batch: int = 256, p_drop: float = 0.1, seed: int = 0, lr: float = 3e-3
) -> MLP:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        x0 = sample_data(labels, g)
        eps = torch.randn(batch, DIM, generator=g)
        s = torch.rand(batch, 1, generator=g)
        x_t = (1 - s) * x0 + s * eps
        labels = torch.where(torch.rand(batch, generator=g) < p_drop, NULL, labels)
        loss = (net(x_t, labels) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.requires_grad_(False).eval()


@torch.no_grad()
def euler_sample(net: MLP, labels: torch.Tensor, steps: int, g: torch.Generator, scale: float = 1.0):
    """The teacher's flow ODE on the released (shift 5) grid, Euler steps `x += (s' - s) v`."""
    sigmas = flow_grid(steps)[1].tolist()
    x = {"x": torch.randn(labels.shape[0], DIM, generator=g)}
    v_fn = guided(net, labels, scale)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = v_fn(x, torch.full((labels.shape[0],), s))["x"]
        x = {"x": x["x"] + (s_next - s) * v}
    return x["x"]


@torch.no_grad()
def student_sample(net: MLP, labels: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    noise = {"x": torch.randn(labels.shape[0], DIM, generator=g)}
    sigmas = flow_grid(steps)[1][:-1].tolist()
    return simulate(velocity(net, labels), noise, sigmas, steps - 1, generator=g)["x"]


@dataclass
class Metrics:
    in_mode: float  # fraction within IN_MODE of a mode of its own class
    wrong_class: float  # fraction whose nearest mode belongs to another class
    min_mode_mass: float  # smallest share of a class's samples that a mode of it holds
    sliced_w: float  # sliced Wasserstein-2 to fresh data, averaged over classes

    def __str__(self):
        return (
            f"in-mode {self.in_mode:.3f}, wrong {self.wrong_class:.3f}, "
            f"min mode mass {self.min_mode_mass:.3f}, SW {self.sliced_w:.4f}"
        )


def evaluate(x: torch.Tensor, labels: torch.Tensor, seed: int = 99) -> Metrics:
    g = torch.Generator().manual_seed(seed)
    # the modes live in the subspace: classify by it (the sliced distance sees the empty directions)
    dist = torch.cdist(x[:, :SUB], CENTRES.reshape(-1, DIM)[:, :SUB])  # [N, CLASSES * 2]
    own = dist.reshape(-1, CLASSES, 2)[torch.arange(x.shape[0]), labels]  # [N, 2]
    nearest = dist.argmin(1)
    masses, sw = [], []
    projections = torch.nn.functional.normalize(torch.randn(DIM, 256, generator=g), dim=0)
    for c in range(CLASSES):
        mine = labels == c
        side = own[mine].argmin(1)
        masses += [(side == 0).float().mean().item(), (side == 1).float().mean().item()]
        ref = sample_data(torch.full((int(mine.sum()),), c), g)
        a, b = (x[mine] @ projections).sort(0).values, (ref @ projections).sort(0).values
        sw.append((a - b).pow(2).mean().sqrt().item())
    return Metrics(
        in_mode=(own.min(1).values < IN_MODE).float().mean().item(),
        wrong_class=(nearest // 2 != labels).float().mean().item(),
        min_mode_mass=min(masses),
        sliced_w=sum(sw) / len(sw),
    )


def distill(
    teacher: MLP,
    *,
    steps: int = 1000,
    ttur: int = 5,
    batch: int = 256,
    cfg_scale: float = 1.0,
    sign: float = 1.0,
    train_critic: bool = True,
    student_steps: int = 2,
    lr: float = 2e-4,
    critic_lr: float = 2e-3,
    seed: int = 0,
) -> MLP:
    """DMD-2 with the core: returns the EMA student (0.99 from generator step 100)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student, critic = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt_g = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=critic_lr, betas=(0.0, 0.999), weight_decay=0.01)
    sigmas = flow_grid(student_steps)[1][:-1].tolist()

    def draw():
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        noise = {"x": torch.randn(batch, DIM, generator=g)}
        exit_index = int(torch.randint(0, student_steps, (1,), generator=g))
        return labels, noise, exit_index

    for step in range(steps):
        for _ in range(ttur if train_critic else 0):
            labels, noise, exit_index = draw()
            with torch.no_grad():
                x0 = simulate(velocity(student, labels), noise, sigmas, exit_index, generator=g)
            s = score_sigmas(batch, generator=g)
            loss, _ = critic_loss(
                velocity(critic, labels), x0, s=s, eps={"x": torch.randn(batch, DIM, generator=g)}
            )
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 10.0)
            opt_c.step()
        labels, noise, exit_index = draw()
        x0 = simulate(velocity(student, labels), noise, sigmas, exit_index, generator=g)
        s = score_sigmas(batch, generator=g)
        real, fake = guided(teacher, labels, cfg_scale), velocity(critic, labels)
        eps = {"x": torch.randn(batch, DIM, generator=g)}
        loss, _ = generator_loss(x0, real, fake, s=s, eps=eps, weights={"x": sign})
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
        opt_g.step()
        with torch.no_grad():
            decay = 0.99 if step >= 100 else 0.0
            for e, p in zip(ema.parameters(), student.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
    return ema.eval()


def passes(student: Metrics, teacher64: Metrics, teacher2: Metrics) -> list[str]:
    """The acceptance criteria; returns the ones that fail (empty: pass)."""
    failed = []
    if abs(student.in_mode - teacher64.in_mode) > 0.10:
        failed.append("in-mode rate not within 0.10 of the 64-step teacher")
    if student.in_mode < teacher2.in_mode + 0.30:
        failed.append("in-mode rate not 0.30 above the 2-step teacher")
    if student.sliced_w > 1.5 * teacher64.sliced_w:
        failed.append("sliced W > 1.5x the 64-step teacher")
    if student.sliced_w > 0.6 * teacher2.sliced_w:
        failed.append("sliced W > 0.6x the 2-step teacher")
    if student.wrong_class > 0.05:
        failed.append("> 5% wrong-class samples")
    if student.min_mode_mass < 0.25:
        failed.append("a mode lost its mass")
    return failed


EVAL_N = 4096


def eval_labels() -> torch.Tensor:
    return torch.arange(EVAL_N) % CLASSES


def teacher_and_baselines(shared: Path | None = None) -> tuple[MLP, Metrics, Metrics]:
    """The flow-matching teacher, its 64-step metrics and its 2-step ones (the student's sampler).
    `shared`: a directory the test session's workers share; the first to come trains the teacher
    there (~30 s) and the other loads it."""
    teacher = train_teacher() if shared is None else _shared_teacher(shared)
    labels = eval_labels()
    t64 = evaluate(euler_sample(teacher, labels, 64, torch.Generator().manual_seed(7)), labels)
    return teacher, t64, student_metrics(teacher)


def _shared_teacher(shared: Path) -> MLP:
    with FileLock(shared / "dmd_toy_teacher.lock"):
        file = shared / "dmd_toy_teacher.safetensors"
        if not file.exists():
            save_file(train_teacher().state_dict(), file)
        teacher = MLP()
        teacher.load_state_dict(load_file(file))
    return teacher.requires_grad_(False).eval()


def student_metrics(student: MLP) -> Metrics:
    labels = eval_labels()
    return evaluate(student_sample(student, labels, 2, torch.Generator().manual_seed(7)), labels)
