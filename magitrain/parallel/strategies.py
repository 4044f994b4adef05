"""Lightning strategies as magitrain uses them."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (no tensor parallelism) with optional Ulysses context parallelism.

    Lightning's `data_parallel_size="auto"` means one shard group per node (it expects tensor
    parallelism inside a node); magitrain shards the whole model over the whole world instead.
    With `context_parallel=cp > 1` the mesh is (data_parallel, context_parallel) = (world/cp, cp):
    FSDP2 shards over both (torchtitan's dp x cp), the CP ranks of one group read the same batch
    (the sampler and the data plan follow the data_parallel dimension) and split its sequence.
    """

    def __init__(self, context_parallel: int = 1, **kwargs):
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        if context_parallel < 1:
            raise ValueError(f"strategy.context_parallel must be >= 1, got {context_parallel}")
        if context_parallel > 1 and kwargs["tensor_parallel_size"] != 1:
            raise ValueError("strategy.context_parallel > 1 needs tensor_parallel_size=1")
        super().__init__(**kwargs)
        self.context_parallel = context_parallel

    def setup_environment(self) -> None:
        cp = self.context_parallel
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.world_size // (self._tensor_parallel_size * cp)
        if cp == 1:
            return super().setup_environment()
        if self.world_size % cp:
            raise ValueError(f"strategy.context_parallel={cp} must divide the world size {self.world_size}")
        # Lightning's mesh is (data_parallel, tensor_parallel): build it with the cp ranks in the
        # second dimension, then name that dimension for what it is
        self._tensor_parallel_size = cp
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        self._device_mesh = init_device_mesh(
            self.root_device.type,
            (self._data_parallel_size, cp),
            mesh_dim_names=("data_parallel", "context_parallel"),
        )
        self.lightning_module._device_mesh = self._device_mesh
