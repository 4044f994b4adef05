"""Lightning strategies as magitrain uses them."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Pure FSDP2 (no tensor parallelism): every rank of every node is a data-parallel shard.

    Lightning's `data_parallel_size="auto"` means one shard group per node (it expects tensor
    parallelism inside a node); magitrain shards the whole model over the whole world instead.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size // self._tensor_parallel_size
        super().setup_environment()
