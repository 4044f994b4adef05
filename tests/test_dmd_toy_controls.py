"""Negative controls of the DMD toy (tests/dmd_toy_problem.py): a flipped DMD gradient and a frozen
critic must fail the criteria that the distilled student passes (tests/test_dmd_toy.py).

They run shorter than the positive test, and each checks what its length can show:
  - a frozen critic (= the teacher at CFG 1) gives g = 0 exactly, from the first step: the student
    stays the 2-step teacher whatever the length (25 steps here; at 100: in-mode 0.533, SW 0.526, as the
    teacher);
  - a flipped gradient walks away from the data from the first step: at 50 steps its samples are
    further from the data than the 2-step teacher it started as (SW above the teacher's), where the
    right sign has come closer by then (measured 2026-12-07, seed 0: flipped SW 11.4, in-mode 0.000;
    right sign SW 0.385 against the 2-step teacher's 0.526; at 200 steps flipped 2810, right 0.395).
    At this length the right sign does not yet pass the criteria (in-mode 0.430), so failing them
    alone would prove nothing here: the direction of travel is the control.
"""

from __future__ import annotations

import pytest
from dmd_toy_problem import distill, passes, student_metrics, teacher_and_baselines

pytestmark = pytest.mark.slow  # one torch thread, 2026-12-07: ~20 s (and the shared teacher)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, worker_id):
    # under xdist the workers' temp dirs share a parent of this session: one teacher for both files
    return teacher_and_baselines(None if worker_id == "master" else tmp_path_factory.getbasetemp().parent)


def test_a_frozen_critic_leaves_the_student_as_the_two_step_teacher(toy):
    teacher, t64, t2 = toy
    student = student_metrics(distill(teacher, steps=25, train_critic=False))
    print(f"frozen critic: {student}, fails {passes(student, t64, t2)}")
    assert passes(student, t64, t2), f"a frozen critic passed: student {student}"
    assert abs(student.sliced_w - t2.sliced_w) < 0.02 and abs(student.in_mode - t2.in_mode) < 0.02


def test_a_flipped_gradient_walks_away_from_the_data(toy):
    teacher, t64, t2 = toy
    student = student_metrics(distill(teacher, steps=50, sign=-1.0))
    print(f"flipped sign: {student}, fails {passes(student, t64, t2)}")
    assert passes(student, t64, t2), f"a flipped gradient passed: student {student}"
    assert student.sliced_w > t2.sliced_w, f"a flipped gradient came closer to the data: {student}"
