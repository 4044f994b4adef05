"""Shared test fixtures: the golden fixtures of the released implementation, found beside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "weights_tiny.safetensors").is_file():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR.resolve()} (expected ../shared/golden)")
    return GOLDEN_DIR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
