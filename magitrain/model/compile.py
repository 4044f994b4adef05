"""The one torch.compile path of training and inference, with one bound on recompiles.

Sequence lengths change with every clip shape and padded prompt length. Compiled with
`dynamic=None`, a function is first specialised to the shape it sees; the first shape change
recompiles it once with the sequence length symbolic, and later lengths reuse that graph. So each
kind of layer (sandwich / shared, gelu7 / swiglu7, local / global attention) compiles at most
twice, and flex attention likewise; `RECOMPILE_LIMIT` only has to cover the layer kinds. Past the
limit torch falls back to eager, where flex attention materialises the whole score matrix: the
limit is sized never to be reached.
"""

from __future__ import annotations

import torch
from torch import nn

RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def compile_fn(fn, backend: str | object = "inductor"):
    """A compiled function (flex attention) under the shared limits."""
    _raise_recompile_limit()
    return torch.compile(fn, dynamic=None, backend=backend)


def compile_layers(network: nn.Module, backend: str | object = "inductor") -> nn.Module:
    """Compile each transformer layer in place (state-dict names stay the released ones)."""
    _raise_recompile_limit()
    for layer in network.block.layers:
        layer.compile(fullgraph=True, dynamic=None, backend=backend)
    return network
