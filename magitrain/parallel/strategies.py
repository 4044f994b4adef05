"""Lightning strategies as magitrain uses them.

Both directory-checkpoint strategies write a checkpoint under a temporary name and rename it once
every rank is done (`write_directory_atomically`), so a save killed midway never leaves a
`stepN.ckpt` that `ckpt_path=last` would pick, and both read checkpoints without running code:
FSDP2 through `WeightsOnlyDCPReader`, DeepSpeed after `check_deepspeed_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch.strategies as pl_strategies
from lightning.pytorch.strategies import ModelParallelStrategy

from magitrain.checkpoint.atomic_io import write_directory_atomically
from magitrain.checkpoint.safe_load import (
    WeightsOnlyDCPReader,
    check_deepspeed_checkpoint,
    dcp_user_errors,
    load_torch_file,
)


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

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save = super().save_checkpoint
        path = Path(self.broadcast(filepath))
        write_directory_atomically(self, path, lambda partial: save(checkpoint, partial, storage_options))

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's sharded load (ModelParallelStrategy -> fabric's `_load_checkpoint`), reading
        through `WeightsOnlyDCPReader`: torch's default reader unpickles non-tensor entries freely."""
        path = Path(self.broadcast(checkpoint_path))
        if not (path / ".metadata").is_file():  # a single-file checkpoint: Lightning loads it weights-only
            return super().load_checkpoint(path, weights_only=True)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        with dcp_user_errors():
            module_state = {"state_dict": get_model_state_dict(self.model)}
            load(module_state, storage_reader=WeightsOnlyDCPReader(path))
            self.model.load_state_dict(
                module_state["state_dict"], strict=self.lightning_module.strict_loading
            )
            for idx, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{idx}"
                optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
                load(optim_state, storage_reader=WeightsOnlyDCPReader(path))
                set_optimizer_state_dict(
                    self.model, optimizer, optim_state[key], options=StateDictOptions(cpu_offload=True)
                )
        return load_torch_file(path / "meta.pt")


class DeepSpeedStrategy(pl_strategies.DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy; DeepSpeed reads a checkpoint's files with `weights_only=False`,
    so each is checked weights-only first (and the tag `latest` names must stay inside it)."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        save = super().save_checkpoint
        path = Path(self.broadcast(filepath))
        write_directory_atomically(self, path, lambda partial: save(checkpoint, partial, storage_options))

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        if Path(checkpoint_path).is_dir():
            check_deepspeed_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)
