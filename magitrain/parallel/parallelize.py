"""Activation checkpointing, torch.compile and FSDP2 sharding of a MagiHumanDiT, per block.

Order matters (as in torchtitan): checkpointing wraps each block, compile wraps the checkpointed
block, then `fully_shard` shards each block and finally the root, so parameters outside the
blocks (embedders, output heads) form the root's own unit.

FSDP2 precision follows the release: each layer's linears are gathered in `param_dtype` (bf16),
its four norms form their own float32 unit, and no unit casts its forward inputs (FSDP2's default
`cast_forward_inputs=True` would turn the float32 residual stream and RoPE table into bf16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from magitrain.model import MagiHumanDiT
from magitrain.model.compile import compile_layers

log = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    activation_checkpointing: bool | None = None  # None: the model config's (on for the 15B presets)
    # selective checkpointing: only every k-th block (0, k, 2k, ...) recomputes in the backward
    checkpoint_every: int = 1
    # dtype the checkpointed blocks' inputs (the float32 residual stream) are kept in for the
    # backward: float32 | bfloat16 (half the saved activations; needs activation checkpointing)
    saved_activations: str = "float32"
    compile: bool = False
    # FSDP2 mixed precision: block parameters gathered in this dtype, gradients reduced in float32
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True
    # FSDP2 only: keep the sharded parameters, gradients and AdamW states in host memory
    # (CPUOffloadPolicy); the optimiser steps on the CPU. Saves ~14 bytes/parameter/GPU, costs
    # host-device copies every step and a CPU optimiser step.
    cpu_offload: bool = False

    def __post_init__(self):
        if self.checkpoint_every < 1:
            raise ValueError(f"module.parallel.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.saved_activations not in ("float32", "bfloat16"):
            got = self.saved_activations
            raise ValueError(f"module.parallel.saved_activations must be float32 or bfloat16, got {got!r}")


def mixed_precision_policies(cfg: ParallelConfig):
    """(block linears, float32 parts) FSDP2 policies; neither casts forward inputs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reduce = getattr(torch, cfg.reduce_dtype)
    linears = MixedPrecisionPolicy(
        param_dtype=getattr(torch, cfg.param_dtype), reduce_dtype=reduce, cast_forward_inputs=False
    )
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=reduce, cast_forward_inputs=False)
    return linears, float32


def _fsdp2(network: MagiHumanDiT, mesh, cfg: ParallelConfig) -> None:
    from torch.distributed.fsdp import fully_shard

    linears_mp, float32_mp = mixed_precision_policies(cfg)
    shard = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        shard["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in network.block.layers:
        norms = [layer.attention.pre_norm, layer.attention.q_norm, layer.attention.k_norm, layer.mlp.pre_norm]
        fully_shard(norms, mp_policy=float32_mp, **shard)
        fully_shard(layer, mp_policy=linears_mp, **shard)
    # Embedders, RoPE and output heads stay float32, as in the released model.
    fully_shard(network, mp_policy=float32_mp, **{**shard, "reshard_after_forward": False})


def parallelize(
    network: nn.Module, cfg: ParallelConfig, device_mesh=None, trainable: bool = True
) -> nn.Module:
    """Apply checkpointing, compile and (when `device_mesh` is given: FSDP2) sharding in place."""
    if not isinstance(network, MagiHumanDiT):
        raise TypeError(f"parallelize expects a MagiHumanDiT, got {type(network).__name__}")
    checkpointing = cfg.activation_checkpointing
    if checkpointing is None:
        checkpointing = network.config.activation_checkpointing
    network.activation_checkpointing = checkpointing and trainable
    network.checkpoint_every = cfg.checkpoint_every
    if cfg.saved_activations == "bfloat16":
        if not checkpointing:
            raise ValueError(
                "module.parallel.saved_activations=bfloat16 keeps checkpointed block inputs in bf16: "
                "it needs module.parallel.activation_checkpointing=true"
            )
        network.checkpoint_dtype = torch.bfloat16
    if cfg.compile:
        compile_layers(network)
    if device_mesh is not None:
        names = device_mesh.mesh_dim_names or ()
        mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
        if "context_parallel" in names and device_mesh["context_parallel"].size() > 1:
            from .context_parallel import enable_context_parallel

            cp = enable_context_parallel(network, device_mesh["context_parallel"].get_group())
            log.info(
                "Ulysses context parallelism: dp=%d x cp=%d", device_mesh["data_parallel"].size(), cp.size
            )
            # shard over dp x cp: the reduction averages the CP ranks' gradients too
            mesh = device_mesh["data_parallel", "context_parallel"]._flatten("dp_cp")
        _fsdp2(network, mesh, cfg)
    return network


def shard_beside(module: nn.Module, device_mesh) -> nn.Module:
    """FSDP2 for a small float32 module trained beside the networks (DMD-2's discriminator head):
    one unit over the data-parallel mesh, float32 parameters and gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = device_mesh.mesh_dim_names or ()
    if "context_parallel" in names and device_mesh["context_parallel"].size() > 1:
        raise ValueError(
            f"{type(module).__name__} does not support context parallelism (strategy.context_parallel)"
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    float32 = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    fully_shard(module, mesh=mesh, mp_policy=float32)
    return module
