"""Ulysses context parallelism: each rank of a CP group holds 1/cp of the token sequence.

Between the layers a rank holds a contiguous slice of the (video | audio | text) sequence; around
attention an all-to-all turns sequence shards into head shards (each rank sees the whole sequence
for Hq/cp query and Hkv/cp kv heads, so any mask, the frame-local one included, applies
unchanged), and a second all-to-all turns them back. What else assumes the whole sequence:
  - modality routing of the sandwich layers: each rank routes its slice with its own splits;
  - RoPE: the table is computed for the whole sequence and sliced like the tokens;
  - length: the text is zero-padded (as masked padding, the way padded prompts already are) until
    the sequence divides by cp;
  - the output: the final hidden states are all-gathered, so every CP rank computes the same loss.
    The all-gather's backward sums the cp identical losses' gradients, so parameter gradients are
    right once averaged over the CP group: FSDP2 sharding over dp x cp (as torchtitan does), or
    `average_gradients` without it.

Hand-written on torch.distributed's autograd collectives (`torch.distributed.nn.functional`):
PyTorch's own `context_parallel` is ring attention over SDPA only and takes neither a flex
BlockMask nor GQA head groups; the all-to-all formulation here is a few reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather, all_to_all_single


@dataclass
class ContextParallel:
    """The CP group of this rank and the collectives of one Ulysses forward."""

    group: dist.ProcessGroup

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def pad_text(
        self, text: Tensor, text_len: Tensor | None, other_tokens: int
    ) -> tuple[Tensor, Tensor | None]:
        """Zero text tokens appended, masked by `text_len`, until video + audio + text divides by cp."""
        pad = -(other_tokens + text.shape[1]) % self.size
        if not pad:
            return text, text_len
        if text_len is None:
            text_len = torch.full((text.shape[0],), text.shape[1], dtype=torch.long, device=text.device)
        return F.pad(text, (0, 0, 0, pad)), text_len

    def local_range(self, total: int) -> tuple[int, int]:
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n

    def shard(self, x: Tensor, rope: Tensor, splits: tuple[int, int, int]):
        """This rank's slice of the sequence [B, S, D], of the RoPE table [B, S, *], and its
        modality splits (token counts of video, audio, text inside the slice; some may be 0)."""
        start, stop = self.local_range(x.shape[1])
        bounds = list(accumulate(splits))  # (plain ints: also runs on the planner's fake tensors)
        local, lo = [], 0
        for hi in bounds:
            local.append(max(0, min(hi, stop) - max(lo, start)))
            lo = hi
        return x[:, start:stop], rope[:, start:stop], tuple(local)

    def seq_to_heads(self, t: Tensor) -> Tensor:
        """[B, H, S/cp, d] (a sequence slice, all heads) -> [B, H/cp, S, d] (all tokens, a head slice)."""
        B, H, s, d = t.shape
        cp = self.size
        send = t.reshape(B, cp, H // cp, s, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = all_to_all_single(torch.empty_like(send), send, group=self.group)  # [cp: seq chunk, ...]
        return recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * s, d)

    def heads_to_seq(self, t: Tensor) -> Tensor:
        """[B, H/cp, S, d] -> [B, H, S/cp, d]: the inverse of `seq_to_heads`."""
        B, h, S, d = t.shape
        cp = self.size
        send = t.reshape(B, h, cp, S // cp, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = all_to_all_single(torch.empty_like(send), send, group=self.group)  # [cp: head chunk, ...]
        return recv.permute(1, 0, 2, 3, 4).reshape(B, cp * h, S // cp, d)

    def gather(self, x: Tensor) -> Tensor:
        """[B, S/cp, D] on each rank -> [B, S, D] on every rank (autograd: gradients flow back)."""
        return torch.cat(all_gather(x.contiguous(), group=self.group), dim=1)


def enable_context_parallel(network, group: dist.ProcessGroup) -> ContextParallel:
    """Run `network` (a MagiHumanDiT) Ulysses-parallel over `group`: set the CP hook it and its
    attention layers call. The CP degree must divide the kv heads (and so the query heads)."""
    cp = ContextParallel(group)
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
