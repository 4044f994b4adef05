"""Attention backend selection (FA3 -> FA2 -> SDPA) on the CPU. The FlashAttention kernels cannot
be installed here, so their presence is faked through the import system for this test only; the
kernels' equality to SDPA is checked in tests/test_gpu.py."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

import pytest
import torch

attn = importlib.import_module("magitrain.model.attention")  # the package exports the function by that name

HOPPER, AMPERE = (9, 0), (8, 0)


class FakeFinder(importlib.abc.MetaPathFinder):
    """Makes `find_spec` see the named top-level modules (nothing can be imported from them)."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            return importlib.machinery.ModuleSpec(fullname, loader=None)
        return None


@pytest.fixture
def installed(monkeypatch):
    original = list(sys.meta_path)

    def fake(*names):
        for name in ("flash_attn_interface", "flash_attn"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [FakeFinder(names), *original])
        return attn.find_flash_modules()

    return fake


def select(backend, installed, capability=HOPPER, on_cuda=True, dtype=torch.bfloat16, dense_mask=False):
    return attn.select_backend(
        backend,
        on_cuda=on_cuda,
        dtype=dtype,
        dense_mask=dense_mask,
        capability=capability,
        installed=installed,
    )


def test_auto_prefers_fa3_on_hopper_then_fa2_then_sdpa(installed):
    both = installed("flash_attn_interface", "flash_attn")
    assert both == {"flash3": True, "flash2": True}
    assert select("auto", both) == "flash3"
    assert select("auto", both, capability=AMPERE) == "flash2"  # FA3 is built for Hopper only
    fa2 = installed("flash_attn")
    assert select("auto", fa2) == "flash2"
    fa3 = installed("flash_attn_interface")
    assert select("auto", fa3) == "flash3" and select("auto", fa3, capability=AMPERE) == "sdpa"
    none = installed()
    assert select("auto", none) == "sdpa"
    # calls FlashAttention cannot run go to SDPA whatever is installed
    assert select("auto", both, on_cuda=False, capability=None) == "sdpa"
    assert select("auto", both, dtype=torch.float32) == "sdpa"
    assert select("auto", both, dense_mask=True) == "sdpa"
    assert select("sdpa", both) == "sdpa"


def test_explicit_flash_backends_fail_with_the_reason(installed):
    both, fa2, none = installed("flash_attn_interface", "flash_attn"), installed("flash_attn"), installed()
    assert select("flash", both) == "flash3" and select("flash", both, capability=AMPERE) == "flash2"
    assert select("flash2", both) == "flash2" and select("flash3", both) == "flash3"
    with pytest.raises(RuntimeError, match="'flash3' asked for, but flash_attn_interface is not installed"):
        select("flash3", fa2)
    with pytest.raises(RuntimeError, match="no FlashAttention is usable"):
        select("flash", none)
    with pytest.raises(ValueError, match="the flash2 backend takes no dense mask"):
        select("flash2", both, dense_mask=True)


def test_cpu_calls_use_sdpa_and_unknown_backends_are_refused():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    torch.testing.assert_close(attn.attention(q, k, k), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be one of"):
        attn.attention(q, k, k, backend="flash4")
