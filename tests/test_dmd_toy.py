"""The DMD toy (tests/dmd_toy_problem.py, where the problem and its measurements are described): a
2-step student distilled by the same core the recipe uses matches the 64-step teacher and beats the
2-step teacher; with guidance the loss is wired and bounded. Its negative controls are in
tests/test_dmd_toy_controls.py (a file of their own, so that the two run on both test workers)."""

from __future__ import annotations

import pytest
import torch
from dmd_toy_problem import (
    RADIUS,
    distill,
    eval_labels,
    evaluate,
    passes,
    student_metrics,
    student_sample,
    teacher_and_baselines,
)

pytestmark = pytest.mark.slow  # one torch thread, 2026-12-07, two test workers: ~150 s (teacher 32 s)

# Shorter than the 1000 steps of docs/training.md's figures; 700 pass with margin (2026-12-07, seed 0:
# in-mode 0.898 against the limit 0.833, sliced W 0.232 against 0.316; at 500 steps 0.869 and 0.305).
STEPS = 700


@pytest.fixture(scope="module")
def toy(tmp_path_factory, worker_id):
    # under xdist the workers' temp dirs share a parent of this session: one teacher for both files
    return teacher_and_baselines(None if worker_id == "master" else tmp_path_factory.getbasetemp().parent)


def test_two_step_student_matches_the_64_step_teacher(toy):
    teacher, t64, t2 = toy
    student = student_metrics(distill(teacher, steps=STEPS))
    print(f"teacher64 {t64}\nteacher2 {t2}\nstudent {student}")  # shown by pytest -rP
    failed = passes(student, t64, t2)
    assert not failed, f"{failed}\nstudent {student}\nteacher64 {t64}\nteacher2 {t2}"


def test_guided_distillation_is_wired_and_bounded(toy):
    """With CFG > 1 the shifted score timesteps push modes outward (known limit): check only that
    guidance reaches the loss (the student differs from an unguided one) and samples stay bounded."""
    teacher, _, _ = toy
    plain, guided_student = distill(teacher, steps=30), distill(teacher, steps=30, cfg_scale=3.0)
    labels = eval_labels()
    x = student_sample(guided_student, labels, 2, torch.Generator().manual_seed(7))
    assert torch.isfinite(x).all() and x.norm(dim=1).max() < 10 * RADIUS
    assert evaluate(x, labels).wrong_class <= 0.05
    assert not torch.equal(x, student_sample(plain, labels, 2, torch.Generator().manual_seed(7)))
