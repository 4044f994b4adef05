"""Parallel setup in one place: what each Lightning strategy needs done to a network.

Recipes call `parallelize(network, module)` from `configure_model`; the strategy itself (DDP,
FSDP2 through `ModelParallelStrategy`, DeepSpeed ZeRO) comes from `conf/strategy/`.
"""

from .parallelize import ParallelConfig, parallelize, shard_beside

__all__ = ["ParallelConfig", "parallelize", "shard_beside"]
