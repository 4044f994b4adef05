"""The frame every recipe shares: networks by role, built lazily so strategies can shard them.

A recipe subclasses `MagiHumanModule`, builds its networks in `configure_model` with
`build_network` (strict `load_official` of an init checkpoint, then `magitrain.parallel`), and
owns its losses and optimisers. Frozen codecs, when the data is raw media, are held outside the
module's state dict and encode batches on the training device (with `codecs.offload`, they wait in
host memory between batches).
"""

from __future__ import annotations

import zlib
from contextlib import nullcontext
from dataclasses import asdict

import lightning.pytorch as L
import torch

from magitrain.checkpoint import load_official
from magitrain.data.prompts import latent_geometry
from magitrain.errors import UserError
from magitrain.flow.tread import TreadConfig
from magitrain.model import MagiHumanConfig, MagiHumanDiT
from magitrain.parallel import ParallelConfig, parallelize

from .optim import OptimConfig, build_optimizer_and_schedule


class MagiHumanModule(L.LightningModule):
    def __init__(
        self,
        model: MagiHumanConfig,
        optim: OptimConfig | None = None,
        parallel: ParallelConfig | None = None,
        init: str | None = None,
        codecs=None,
        seed: int = 0,
        tread: TreadConfig | None = None,
    ):
        super().__init__()
        self.model_config = model
        self.optim_config = optim or OptimConfig()
        self.parallel_config = parallel or ParallelConfig()
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "optim": asdict(self.optim_config),
                "parallel": asdict(self.parallel_config),
                "init": init,
                "seed": seed,
                "tread": asdict(tread or TreadConfig()),
            }
        )
        self.init_path = init
        self.seed = seed
        self.tread_config = tread or TreadConfig()
        self.last_route = None  # the route of the latest training forward (Throughput counts it)
        object.__setattr__(self, "codecs", codecs)  # frozen helpers: not part of the state dict
        self.model: MagiHumanDiT | None = None
        self.ema: MagiHumanDiT | None = None
        self._ema_requested = False
        # set by callbacks.NonFiniteGuard before each optimiser step: True when it was skipped
        self.skipped_optimizer_step = False

    # ----- networks -------------------------------------------------------------------------
    def request_ema(self) -> None:
        """Called by the EMA callback before `configure_model`: keep a float32 shadow of `model`."""
        self._ema_requested = True

    def _zero3_gather(self, network: MagiHumanDiT):
        """ZeRO-3 partitions parameters as they are created: gather them to load a checkpoint."""
        strategy = getattr(self._trainer, "strategy", None) if self._trainer else None
        if getattr(strategy, "zero_stage_3", False):
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(network.parameters()), modifier_rank=0)
        return nullcontext()

    def build_network(
        self,
        init: str | None,
        trainable: bool,
        storage_dtype: torch.dtype | None = None,
        parallel: ParallelConfig | None = None,
    ) -> MagiHumanDiT:
        """A MagiHumanDiT loaded strictly from `init` (or freshly initialised), then parallelised.

        `storage_dtype` (a frozen network's option, e.g. bf16) stores the block linears in that
        dtype before anything is loaded or sharded, so no float32 copy of them ever exists.
        `parallel` replaces the module's parallel config for this network (e.g. CPU offload of
        DMD-2's frozen teacher alone).
        """
        from magitrain.inference.networks import to_inference_dtype  # (pulls in diffusers: lazily)

        parallel = parallel or self.parallel_config
        mesh = self.device_mesh
        if mesh is None:
            network = MagiHumanDiT(self.model_config)
            if storage_dtype is not None:
                to_inference_dtype(network, storage_dtype)
            if init:
                with self._zero3_gather(network):
                    load_official(network, init)
            return parallelize(network, parallel, None, trainable)
        # FSDP2: build on the meta device, shard, then materialise only the local shards.
        with torch.device("meta"):
            network = MagiHumanDiT(self.model_config)
        if storage_dtype is not None:
            to_inference_dtype(network, storage_dtype)
        parallelize(network, parallel, mesh, trainable)
        # CPU offload keeps the shards in host memory (FSDP2 copies each block to the device)
        network.to_empty(device="cpu" if parallel.cpu_offload else self.device)
        network.reset_parameters()
        if init:
            _load_official_sharded(network, init)
        return network

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once
            return
        self.model = self.build_network(self.init_path, trainable=True)
        if self._ema_requested:
            self.ema = self.build_network(None, trainable=False)
            self.ema.requires_grad_(False)
            with torch.no_grad():
                for shadow, param in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    shadow.copy_(param.detach())

    # ----- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 0
        return build_optimizer_and_schedule(self, self.model.parameters(), self.optim_config, total)

    # ----- data -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.codecs is not None:
            self.codecs.to(self.device)

    # a recipe that generates its own samples (DMD-2) may train on prompt batches: text, no video
    trains_on_prompts = False

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if "latent_shape" in batch and "video_latent" not in batch:  # prompt shards (data/prompts.py)
            if not self.trains_on_prompts:
                raise UserError(
                    f"the data holds prompt samples (text_emb, no video_latent): {type(self).__name__} "
                    "needs latent or raw shards (only recipe=dmd2_distill trains on prompts)"
                )
            return batch
        if "video_latent" not in batch:  # raw media: encode with the frozen codecs on this device
            from magitrain.data import encode_raw_batch

            if self.codecs is None:
                raise ValueError("the data yields raw media but no codecs were configured (set codecs=...)")
            with self.codecs.on_device():  # (codecs.offload: only now on the device)
                batch = encode_raw_batch(batch, self.codecs)
        return batch

    @staticmethod
    def batch_shape(batch: dict) -> tuple[int, int]:
        """(samples, tokens per sample) of a latent batch, for throughput accounting."""
        (_, T, H, W), (N, _) = latent_geometry(batch)
        return batch["text_emb"].shape[0], T * (H // 2) * (W // 2) + N + batch["text_emb"].shape[1]

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the data-parallel replicas (ranks that read different batches)."""
        mesh = self.device_mesh
        if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
            return mesh["data_parallel"].get_local_rank()
        return self.global_rank

    def sample_generators(self, batch: dict, stream: str = "") -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, step, sample key) and `stream`.

        The noise a sample gets depends on neither the rank, the batch composition nor the
        process history, so DDP equals one process on the same global batch, and a resumed run
        draws exactly what an uninterrupted one would. A named `stream` is a sequence of its own:
        an option drawing from it leaves the numbers of the default stream as they were.
        """
        # without keys: the data-parallel rank (context-parallel ranks of one group share a batch)
        rank = self.data_parallel_rank
        keys = batch.get("key") or [f"{rank}:{i}" for i in range(batch["text_emb"].shape[0])]
        device = self.device if self.device.type == "cuda" else "cpu"
        step, suffix = self.global_step, f"/{stream}" if stream else ""
        return [
            torch.Generator(device).manual_seed(zlib.crc32(f"{self.seed}/{step}/{key}{suffix}".encode()))
            for key in keys
        ]

    def token_route(self, batch: dict, stream: str = "tread"):
        """The TREAD route of this batch's training forward (None with `module.tread` off), drawn
        from the per-sample `stream`; kept as `last_route` for the throughput count."""
        route = None
        if self.tread_config.enabled:
            (_, T, H, W), (N, _) = latent_geometry(batch)
            pt, ph, pw = self.model_config.patch_size
            counts = {"video": (T // pt) * (H // ph) * (W // pw), "audio": N}
            gens = self.sample_generators(batch, stream)
            route = self.tread_config.draw(gens, counts, self.model_config.num_layers, self.device)
        self.last_route = route
        return route

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                checkpoint["wandb_run_id"] = logger.experiment.id


def _load_official_sharded(network: MagiHumanDiT, path: str) -> None:
    """Load a released checkpoint into an FSDP2-sharded network: rank 0 reads, all ranks receive shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {}
    if dist.get_rank() == 0:
        with torch.device("meta"):
            reader = MagiHumanDiT(network.config)
        full = load_official(reader, path).state_dict()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(network, full, options=options)


def voice_kwargs(batch: dict) -> dict:
    """The batch's voice references (`data.voice_reference`) as the network's keyword arguments;
    none when the data gives none, so a run without them calls the network as before."""
    if "ref_audio_latent" not in batch:
        return {}
    return {"ref_audio": batch["ref_audio_latent"], "ref_len": batch["ref_audio_len"]}
