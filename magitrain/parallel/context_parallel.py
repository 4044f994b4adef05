"""Ulysses context parallelism: each rank of a CP group holds a slice of the token sequence.

Between the layers a rank holds a contiguous slice of the (video | audio | text) sequence; around
attention an all-to-all turns sequence shards into head shards (each rank sees the whole sequence
for Hq/cp query and Hkv/cp kv heads, so any mask, the frame-local one included, applies
unchanged), and a second all-to-all turns them back. What else assumes the whole sequence:
  - modality routing of the sandwich layers: each rank routes its slice with its own splits;
  - RoPE: the table is computed for the whole sequence and sliced like the tokens;
  - length: the slices may differ in length (the all-to-alls take per-rank split sizes), so no
    sequence length needs padding;
  - the output: the final hidden states are gathered, so every CP rank computes the same loss
    (and, sampling, the same next latent). The gather's backward sums the cp identical
    losses' gradients, so parameter gradients are right once averaged over the CP group: FSDP2
    sharding over dp x cp (as torchtitan does), or `average_gradients` without it.

Slice boundaries fall on multiples of `quantum` tokens, chosen so that every per-token row of the
activations a vectorised CPU kernel runs over (hidden, MLP widths) starts on a whole SIMD register
block: elementwise kernels then process each token with the same vector or scalar code as one
process does (sigmoid's scalar and vector paths differ in the last bit). With that, CP on the CPU
is bit-identical to one process (same thread count), which `infer.py cp=N` relies on to write the
same mp4 bytes for any N.

Hand-written on torch.distributed's autograd collectives (`torch.distributed.nn.functional`):
PyTorch's own `context_parallel` is ring attention over SDPA only and takes neither a flex
BlockMask nor GQA head groups; the all-to-all formulation here is a few reshapes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single

# A CPU matmul of fewer rows takes another kernel (last-bit differences): no slice makes such pieces.
MIN_ROWS = 4
# Floats per SIMD block a CPU elementwise kernel steps by: 2 x AVX-512 registers, doubled for margin.
SIMD_FLOATS = 64


@dataclass
class ContextParallel:
    """The CP group of this rank and the collectives of one Ulysses forward.

    `shard` fixes the slice lengths of the forward it starts (`slice_sizes`); the attention
    layers' all-to-alls and the final gather use them.
    """

    group: dist.ProcessGroup
    quantum: int = 1  # slice boundaries are multiples of this many tokens
    sizes: tuple[int, ...] = ()  # tokens per rank in the current forward

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, x: Tensor, rope: Tensor, splits: tuple[int, int, int]):
        """This rank's slice of the sequence [B, S, D], of the RoPE table [B, S, *], and its
        modality splits (token counts of video, audio, text inside the slice; some may be 0)."""
        self.sizes = slice_sizes(tuple(splits), self.size, self.quantum)
        start = sum(self.sizes[: self.rank])
        stop = start + self.sizes[self.rank]
        local, lo = [], 0
        for n in splits:
            local.append(max(0, min(lo + n, stop) - max(lo, start)))
            lo += n
        return x[:, start:stop], rope[:, start:stop], tuple(local)

    def seq_to_heads(self, t: Tensor) -> Tensor:
        """[B, H, s, d] (this rank's tokens, all heads) -> [B, H/cp, S, d] (all tokens, a head slice)."""
        B, H, s, d = t.shape
        cp, h = self.size, H // self.size
        send = t.reshape(B, cp, h, s, d).transpose(0, 1).reshape(-1)  # [cp: head chunk, ...]
        counts = [B * h * n * d for n in self.sizes]  # received from each rank: its tokens of my heads
        recv = all_to_all_single(
            t.new_empty(sum(counts)), send, counts, [B * h * s * d] * cp, group=self.group
        )
        parts = [part.view(B, h, n, d) for part, n in zip(recv.split(counts), self.sizes, strict=True)]
        return torch.cat(parts, dim=2)

    def heads_to_seq(self, t: Tensor) -> Tensor:
        """[B, H/cp, S, d] -> [B, H, s, d]: the inverse of `seq_to_heads`."""
        B, h, S, d = t.shape
        cp, s = self.size, self.sizes[self.rank]
        send = torch.cat([part.reshape(-1) for part in t.split(self.sizes, dim=2)])  # [cp: tokens]
        counts = [B * h * n * d for n in self.sizes]
        recv = all_to_all_single(
            t.new_empty(cp * B * h * s * d), send, [B * h * s * d] * cp, counts, group=self.group
        )
        return recv.view(cp, B, h, s, d).transpose(0, 1).reshape(B, cp * h, s, d)  # [cp: head chunk]

    def gather(self, x: Tensor) -> Tensor:
        """[B, s, D] on each rank -> [B, S, D] on every rank (autograd: gradients flow back).

        An all-to-all that sends every rank this rank's slice: its backward is the reverse
        all-to-all (each rank gets every rank's gradient of its slice), summed by `expand`'s
        backward. torch.distributed.nn's `all_gather` is not used: off NCCL its backward takes
        group ranks for global ranks and fails in any CP group without global rank 0 (dp x cp).
        """
        B, s, D = x.shape
        send = x.unsqueeze(0).expand(self.size, B, s, D).reshape(-1)
        counts = [B * n * D for n in self.sizes]
        recv = all_to_all_single(
            x.new_empty(sum(counts)), send, counts, [B * s * D] * self.size, group=self.group
        )
        return torch.cat(
            [part.view(B, n, D) for part, n in zip(recv.split(counts), self.sizes, strict=True)], 1
        )


@functools.lru_cache(maxsize=64)
def slice_sizes(splits: tuple[int, ...], cp: int, quantum: int) -> tuple[int, ...]:
    """Tokens per rank of a sequence of modality segments `splits`: as even as allowed, where a
    boundary is a multiple of `quantum` and cuts no segment into a piece of 1 to MIN_ROWS - 1
    tokens; a slice is empty or holds at least MIN_ROWS tokens (later ranks may get none)."""
    total, edges = sum(splits), [0, *itertools.accumulate(splits)]
    if total < 2 * MIN_ROWS:  # too short to split
        return (total,) + (0,) * (cp - 1)

    def allowed(p: int) -> bool:  # plain Python: dynamo traces it inside a compiled step
        lo = max([e for e in edges if e <= p])
        hi = min([e for e in edges if e > p] or [total])
        return p == lo or (p - lo >= MIN_ROWS and hi - p >= MIN_ROWS)

    candidates = [p for p in range(0, total, quantum) if allowed(p)] + [total]
    bounds = [0]
    for r in range(1, cp):
        fits = [c for c in candidates if c == bounds[-1] or MIN_ROWS <= c - bounds[-1]]
        fits = [c for c in fits if c == total or total - c >= MIN_ROWS]
        bounds.append(min(fits, key=lambda c: (abs(c - total * r / cp), c)))
    bounds.append(total)
    return tuple(hi - lo for lo, hi in itertools.pairwise(bounds))


def token_quantum(config) -> int:
    """The fewest tokens whose rows of every activation width fill whole SIMD blocks."""
    widths = (config.hidden_size, config.swiglu_hidden, config.gelu_hidden)
    return max(SIMD_FLOATS // math.gcd(SIMD_FLOATS, w) for w in widths)


def enable_context_parallel(network, group: dist.ProcessGroup) -> ContextParallel:
    """Run `network` (a MagiHumanDiT) Ulysses-parallel over `group`: set the CP hook it and its
    attention layers call. The CP degree must divide the kv heads (and so the query heads)."""
    cp = ContextParallel(group, quantum=token_quantum(network.config))
    check_degree(network.config, cp.size)
    network.context_parallel = cp
    for layer in network.block.layers:
        layer.attention.context_parallel = cp
    return cp


def check_degree(config, degree: int) -> None:
    """A CP degree splits the heads: it must divide the kv heads (8 in the 15B model)."""
    if degree < 1 or config.num_heads_kv % degree:
        raise ValueError(
            f"context_parallel={degree} must divide the model's {config.num_heads_kv} kv heads "
            f"(model.num_heads_kv); choose a divisor of {config.num_heads_kv}"
        )


def average_gradients(network, group: dist.ProcessGroup) -> None:
    """Average parameter gradients over the CP group (what FSDP2 over dp x cp does in its reduction)."""
    for p in network.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # (gloo has no AVG)
            p.grad.div_(dist.get_world_size(group))
