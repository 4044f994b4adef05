"""One attention function with backends: PyTorch SDPA (always), FlashAttention, flex attention.

Inputs are `q [B, Hq, S, d]`, `k, v [B, Hkv, S, d]` with grouped-query attention: query head i
reads kv head `i // (Hq / Hkv)`. The mask is None (full attention), a dense boolean tensor
broadcastable to `[B, Hq, S, S]` (True = may attend) or a flex-attention `BlockMask`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
BACKENDS = ("auto", "sdpa", "flash", "flex")


def _is_block_mask(mask) -> bool:
    return mask is not None and not isinstance(mask, Tensor)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else the tensor's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
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
    use_flash = backend == "flash" or (
        backend == "auto"
        and HAS_FLASH_ATTN
        and q.is_cuda
        and dtype in (torch.float16, torch.bfloat16)
        and mask is None
    )
    if use_flash:
        if not HAS_FLASH_ATTN:
            raise RuntimeError("attention backend 'flash' asked for, but flash_attn is not installed")
        if mask is not None:
            raise ValueError("the flash backend takes no dense mask; use sdpa or flex")
        return _flash(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
