"""CI guards: the product-import check names a broken import, and the golden-parity tests fail
(not skip) under CI=true when ../shared/golden is missing, while a bare clone skips them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

GOLDEN_TEST = """
def test_uses_golden(golden_dir):
    assert golden_dir.is_dir()
"""


def _pytest_without_golden(tmp_path, ci: str) -> subprocess.CompletedProcess:
    repo = tmp_path / ci / "repo"  # no ../shared/golden beside this copy
    (repo / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "tests" / "test_golden.py").write_text(GOLDEN_TEST)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(repo / "tests")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_golden_tests_fail_under_ci_and_skip_in_a_bare_clone(tmp_path):
    ci = _pytest_without_golden(tmp_path, "true")
    assert ci.returncode != 0 and "CI=true requires them" in ci.stdout, ci.stdout[-2000:]
    bare = _pytest_without_golden(tmp_path, "")
    assert bare.returncode == 0 and "1 skipped" in bare.stdout, bare.stdout[-2000:]


def test_the_import_check_names_an_import_that_fails(tmp_path):
    (tmp_path / "decord.py").write_text("raise ImportError('libdecord.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "check_imports.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "FAILED  decord (video decoding)" in result.stdout and "libdecord.so" in result.stdout
    assert "ok      torchaudio and libtorchaudio" in result.stdout
