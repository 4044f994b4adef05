"""SR distillation's acceptance toy (scripts/sr_dmd_toy.py, where the problem is described), shortened
to fit the suite: a 400-step teacher, 100 generator steps of the 2-step student (batch 64, no EMA).
The full script (600 steps, 1-step student, EMA) and its figures: docs/benchmarks.md.

At this length the student does not yet reach the 5-step teacher; what it must show is the
direction and size of travel, which a broken core or a wrong SR source does not give:
  - the 2-step student ends at least 0.15 above where it started (the teacher sampled with the
    student's own 2-step distilled sampler) and above the teacher's 2 UniPC steps;
  - a flipped DMD gradient, 20 steps: below where it started (it walks away from the data);
  - a frozen critic (= the teacher): g = 0, so the student stays where it started (within 0.02).
Measured 2026-12-07 on the shared 2-core VM (seed 0): 5-step teacher 0.671, 2 UniPC steps 0.338,
start 0.200; student 0.440; flipped 0.000; frozen critic 0.201; ~20-25 s. A core whose backward
simulation re-noises towards Gaussian noise instead of the SR source (`simulate` without
`source=`) leaves the student at 0.094 after the same 100 steps: this test fails it.
"""

from __future__ import annotations

import torch
from conftest import REPO, load_script


def _toy():
    return load_script(REPO / "scripts" / "sr_dmd_toy.py")


def test_the_sr_student_distils_and_its_controls_do_not():
    toy = _toy()
    teacher = toy.train_teacher(400)
    cond = toy.eval_conditions()[:1024]

    def quality(sample, net, steps):
        return toy.quality(sample(net, cond, steps, torch.Generator().manual_seed(7)), cond)

    start = quality(toy.student_sample, teacher, 2)
    unipc_2 = quality(toy.teacher_sample, teacher, 2)
    never = 10**9  # no EMA: the raw student

    student = quality(toy.student_sample, toy.distill(teacher, steps=100, batch=64, ema_start=never), 2)
    flipped = quality(
        toy.student_sample, toy.distill(teacher, steps=20, batch=64, ema_start=never, sign=-1.0), 2
    )
    frozen = quality(
        toy.student_sample, toy.distill(teacher, steps=10, batch=64, ema_start=never, train_critic=False), 2
    )
    figures = (
        f"start {start:.3f}, 2 UniPC steps {unipc_2:.3f}, student {student:.3f}, "
        f"flipped {flipped:.3f}, frozen {frozen:.3f}"
    )
    print(figures)
    assert student >= start + 0.15 and student > unipc_2, figures
    assert flipped < start, figures
    assert abs(frozen - start) <= 0.02, figures
