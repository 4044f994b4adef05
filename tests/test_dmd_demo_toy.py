"""Issue 31: the README's DMD-2 demo, run as written on a learnable toy, must give a student at least
as close to the data as its teacher. `scripts/dmd_toy.py` shortened: the toy's four prompt-named
latent classes, a base trained by `experiment=cpu_demo` for 200 steps (not 600) and exported, the
README's DMD-2 train and export lines read from README.md and run unchanged, and one seed per class
prompt scored through `MagiHumanPipeline.generate_latents`.

Before the fix `experiment=cpu_demo` gave the student 1e-3 (warmup 20) and left the critic at the
recipe's 4e-7, and this test fails so (checked with the run's settings given as overrides, and with
conf/experiment_recipe/cpu_demo/dmd2_distill.yaml removed): after the README's 30 generator steps
the student is worse than its teacher in class accuracy, pairing and both distances (figures in
docs/benchmarks.md, "DMD-2 demo on a learnable toy"; at 10 steps the old rates had not diverged yet,
hence the README's 30). ~70 s of CPU time (measured on a 2-core VM).
"""

from __future__ import annotations

from conftest import REPO, load_script


def _toy_script():
    return load_script(REPO / "scripts" / "dmd_toy.py")


def test_the_readme_dmd2_demo_gives_a_student_as_close_to_the_data_as_its_teacher(tmp_path, monkeypatch):
    toy = _toy_script()
    monkeypatch.chdir(tmp_path)  # (run() works in its folder and sets MAGITRAIN_ROOT: both restored)
    monkeypatch.setenv("MAGITRAIN_ROOT", str(tmp_path))
    results = toy.run(tmp_path, base_steps=200, dmd_steps=None, extra=[], seeds=1)
    worse = toy.closer_or_equal(results["student"], results["teacher"])
    print(results)  # (pytest -rP)
    assert not worse, f"the student is worse than its teacher in {worse}: {results}"
