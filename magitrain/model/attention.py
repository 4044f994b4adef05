"""One attention function with backends: PyTorch SDPA (always), FlashAttention, flex attention.

FlashAttention: FA3 (`flash_attn_interface`, the release's Hopper kernel) where it is installed and
the GPU is a Hopper, else FA2 (`flash_attn`), else SDPA; see `select_backend`.

Inputs are `q [B, Hq, S, d]`, `k, v [B, Hkv, S, d]` with grouped-query attention: query head i
reads kv head `i // (Hq / Hkv)`. The mask is None (full attention), a dense boolean tensor
broadcastable to `[B, Hq, S, S]` (True = may attend) or a flex-attention `BlockMask`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flash", "flash3", "flash2", "flex")  # flash: FA3 if usable, else FA2
FLASH_MODULES = {"flash3": "flash_attn_interface", "flash2": "flash_attn"}  # fastest first


def _is_block_mask(mask) -> bool:
    return mask is not None and not isinstance(mask, Tensor)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else the tensor's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def find_flash_modules() -> dict[str, bool]:
    """Which FlashAttention versions can be imported, by backend name."""
    return {kind: importlib.util.find_spec(module) is not None for kind, module in FLASH_MODULES.items()}


FLASH_INSTALLED = find_flash_modules()  # a constant, so compiled layers do not trace importlib


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def select_backend(
    backend: str,
    *,
    on_cuda: bool,
    dtype: torch.dtype,
    dense_mask: bool,
    capability: tuple[int, int] | None,
    installed: dict[str, bool] = FLASH_INSTALLED,
) -> str:
    """The kernel of a call without a BlockMask: "flash3", "flash2" or "sdpa".

    "auto" takes FlashAttention when it can run the call (CUDA, fp16/bf16, no dense mask): FA3 on a
    Hopper GPU (compute capability 9.x, the only one FA3 is built for) when installed, else FA2 when
    installed, else SDPA. "flash" insists on FlashAttention (FA3 before FA2), "flash3"/"flash2" on
    one version; they fail with the reason instead of falling back.
    """
    fits = on_cuda and dtype in (torch.float16, torch.bfloat16) and not dense_mask
    hopper = capability is not None and capability[0] == 9
    usable = [k for k in FLASH_MODULES if installed[k] and (k != "flash3" or hopper)]
    if backend == "sdpa" or (backend == "auto" and not (fits and usable)):
        return "sdpa"
    if dense_mask:
        raise ValueError(f"the {backend} backend takes no dense mask; use sdpa or flex")
    if backend in FLASH_MODULES:
        if not installed[backend]:
            raise RuntimeError(
                f"attention backend {backend!r} asked for, but {FLASH_MODULES[backend]} is not installed"
            )
        return backend
    if not usable:
        raise RuntimeError(
            "attention backend 'flash' asked for, but no FlashAttention is usable: install flash_attn "
            "(FA2) or, on a Hopper GPU, flash_attn_interface (FA3)"
        )
    return usable[0]


def _flash(q: Tensor, k: Tensor, v: Tensor, kind: str) -> Tensor:
    if kind == "flash3":
        from flash_attn_interface import flash_attn_func
    else:
        from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out  # FA3 releases before 3.0 also return the LSE
    return out.transpose(1, 2)


_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":  # flex attention is only fast compiled
        if _compiled_flex is None:
            from .compile import compile_fn  # the shared compile path: bounded recompiles

            _compiled_flex = compile_fn(flex_attention)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, backend: str = "auto") -> Tensor:
    """Softmax attention with scale 1/sqrt(d) in the compute dtype; returns `[B, Hq, S, d]`."""
    dtype = compute_dtype(v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if _is_block_mask(mask):
        if backend not in ("auto", "flex"):
            raise ValueError(f"a BlockMask needs the flex backend, not {backend!r}")
        return _flex(q, k, v, mask)
    if backend == "flex":
        raise ValueError("the flex backend needs a BlockMask (build it with SequenceLayout.block_mask)")
    kind = select_backend(
        backend, on_cuda=q.is_cuda, dtype=dtype, dense_mask=mask is not None,
        capability=_capability(q.device.index or 0) if q.is_cuda else None,
    )  # fmt: skip
    if kind != "sdpa":
        return _flash(q, k, v, kind)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
