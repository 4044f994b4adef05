"""Activation checkpointing, torch.compile and FSDP2 sharding of a MagiHumanDiT, per block.

Order matters (as in torchtitan): checkpointing wraps each block, compile wraps the checkpointed
block, then `fully_shard` shards each block and finally the root, so parameters outside the
blocks (embedders, output heads) form the root's own unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from magitrain.model import MagiHumanDiT


@dataclass
class ParallelConfig:
    activation_checkpointing: bool = False
    compile: bool = False
    # FSDP2 mixed precision: block parameters gathered in this dtype, gradients reduced in float32
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True


def _fsdp2(network: MagiHumanDiT, mesh, cfg: ParallelConfig) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks_mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, cfg.param_dtype), reduce_dtype=getattr(torch, cfg.reduce_dtype)
    )
    for layer in network.block.layers:
        fully_shard(layer, mesh=mesh, mp_policy=blocks_mp, reshard_after_forward=cfg.reshard_after_forward)
    # Embedders, RoPE and output heads stay float32, as in the released model.
    root_mp = MixedPrecisionPolicy(reduce_dtype=getattr(torch, cfg.reduce_dtype))
    fully_shard(network, mesh=mesh, mp_policy=root_mp, reshard_after_forward=False)


def parallelize(
    network: nn.Module, cfg: ParallelConfig, device_mesh=None, trainable: bool = True
) -> nn.Module:
    """Apply checkpointing, compile and (when `device_mesh` is given: FSDP2) sharding in place."""
    if not isinstance(network, MagiHumanDiT):
        raise TypeError(f"parallelize expects a MagiHumanDiT, got {type(network).__name__}")
    network.activation_checkpointing = cfg.activation_checkpointing and trainable
    if cfg.compile:
        for layer in network.block.layers:  # in place: state-dict names stay the released ones
            layer.compile(fullgraph=True)
    if device_mesh is not None:
        mesh = (
            device_mesh["data_parallel"]
            if "data_parallel" in (device_mesh.mesh_dim_names or ())
            else device_mesh
        )
        _fsdp2(network, mesh, cfg)
    return network
