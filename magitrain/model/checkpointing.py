"""Activation checkpointing of one block, optionally keeping its saved input in bfloat16.

A checkpointed block keeps only its input for the backward, where it runs again: in this model
that input is the float32 residual stream, B x S x 5120 x 4 bytes per block (~1.3 GB per
1080p sample and block). With `saved_dtype=bfloat16` the forward still runs on the exact float32
input and the gradient flows back in float32; only the copy kept for the recomputation is
rounded, so the backward evaluates the block's Jacobian at a point within bf16 rounding of the
forward's. The block's linears see bf16 inputs under autocast anyway, after its float32 norms.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def saved_as(x: Tensor, dtype: torch.dtype | None):
    """Tensors autograd saves inside are stored as usual, except `x` itself: in `dtype`."""
    if dtype is None or dtype == x.dtype:
        yield
        return

    target = weakref.ref(x)  # autograd keeps the hooks with what they saved: no strong ref to x

    def pack(t: Tensor):
        return (t.to(dtype), t.dtype) if t is target() else t

    def unpack(packed):
        return packed[0].to(packed[1]) if isinstance(packed, tuple) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def checkpoint_block(layer: nn.Module, x: Tensor, *args, saved_dtype: torch.dtype | None = None) -> Tensor:
    """`layer(x, *args)`, recomputed in the backward from its input (kept in `saved_dtype`).

    Non-reentrant checkpointing saves the block's inputs with `save_for_backward` outside its own
    saved-tensor hooks, so the hooks of `saved_as` see exactly those (the block's own activations
    are not saved at all).
    """
    with saved_as(x, saved_dtype):
        return checkpoint(layer, x, *args, use_reentrant=False)
