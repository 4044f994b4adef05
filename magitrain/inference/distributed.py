"""Context-parallel generation: `torchrun --nproc-per-node N infer.py ... cp=N`.

Every rank runs the whole pipeline's control flow on the whole latents; each DiT forward splits
its sequence over the ranks with the training's Ulysses attention (magitrain.parallel), whose
gathered output is the same on every rank, so the samplers' updates and the noise (a seeded
generator on every rank) stay identical everywhere. The text encoder and image encoder run on
rank 0 only and their outputs are broadcast, so no rank can disagree about the conditioning; the
decoder runs on rank 0, which alone writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from magitrain.parallel.context_parallel import enable_context_parallel


def launch_context_parallel(
    degree: int, device: str = "auto"
) -> tuple[dist.ProcessGroup | None, torch.device]:
    """(the CP group, this rank's device) of `cp=degree`; (None, device) for a single process.

    The ranks come from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); the world is the CP
    group. gloo on the CPU, nccl on CUDA (rank i on cuda:LOCAL_RANK with device=auto or cuda).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if degree < 1:
        raise ValueError(f"cp={degree}: the context-parallel degree must be >= 1")
    if degree > 1 and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"cp={degree} needs {degree} processes: run "
            f"`torchrun --nproc-per-node {degree} infer.py ... cp={degree}`"
        )
    if world != degree:
        raise ValueError(
            f"cp={degree} but torchrun started {world} processes (WORLD_SIZE={world}): "
            f"cp must equal --nproc-per-node"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and degree > 1:
        device = torch.device("cuda", local_rank)
    if degree == 1:
        return None, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
        timeout=datetime.timedelta(minutes=30),  # rank 0 alone decodes and writes between clips
    )
    return dist.group.WORLD, device


@dataclass
class Ranks:
    """The CP group of a pipeline (None: one process) and what its ranks share."""

    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def writer(self) -> bool:
        """Rank 0: it encodes, decodes and writes; the others only run the DiTs."""
        return self.group is None or dist.get_rank(self.group) == 0

    def split_networks(self, *networks) -> None:
        """Ulysses-split every forward of these networks over the group (the degree must divide
        their kv heads)."""
        if self.group is None:
            return
        for network in networks:
            if network is not None:
                enable_context_parallel(network, self.group)

    def broadcast(self, tensors: list[Tensor | None], device: torch.device) -> list[Tensor | None]:
        """Rank 0's tensors (None entries included) on every rank, on `device`."""
        if self.group is None:
            return tensors
        meta = [[None if t is None else (tuple(t.shape), t.dtype) for t in tensors] if self.writer else None]
        dist.broadcast_object_list(meta, src=0, group=self.group)
        out = []
        for i, entry in enumerate(meta[0]):
            if entry is None:
                out.append(None)
                continue
            t = (
                tensors[i].to(device).contiguous()
                if self.writer
                else torch.empty(*entry[0], dtype=entry[1], device=device)
            )
            dist.broadcast(t, src=0, group=self.group)
            out.append(t)
        return out

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object), in rank order, on every rank."""
        if self.group is None:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values
