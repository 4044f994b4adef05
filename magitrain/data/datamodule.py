"""The LightningDataModule: shards -> bucketed, rank/worker-split, resumable batches.

Lightning calls `state_dict()` when it saves a checkpoint and `load_state_dict()` when it resumes;
the state is the data position (position.py) plus the bad-input counters (quality.py). The
module's `on_before_batch_transfer` hook runs in the main process for every batch the training
loop takes (not for batches merely prefetched), which is where consumption is counted.
"""

import logging
import signal
from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from magitrain.data.buckets import parse_buckets
from magitrain.data.dataset import ShardDataset
from magitrain.data.decode import RawOptions
from magitrain.data.position import DataPosition
from magitrain.data.quality import BadInputTracker
from magitrain.data.shards import parse_datasets
from magitrain.data.span import AVPolicy
from magitrain.data.voice import VoiceReference

log = logging.getLogger(__name__)
STATE_VERSION = 1
VOICE_OFF = MappingProxyType(asdict(VoiceReference()))  # data.voice_reference's defaults (off)


class EpochLoader(DataLoader):
    """A DataLoader over the data stream from the DataModule's position on: at every iter() it asks
    where the stream stands (`start() -> (epoch, batch)`), then runs data epochs, each one pass of
    its (persistent) workers, to their end: one epoch when `endless` is false, else epoch after
    epoch. Under a Trainer the stream is endless and has no len(): Lightning sees a single epoch
    that `trainer.max_steps` ends, so it never cuts a data epoch to the length of another (their
    batch counts differ when there are several buckets) nor restarts one after a resume."""

    def __init__(self, dataset: ShardDataset, start, num_workers: int, endless: bool, **kwargs):
        super().__init__(
            dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0, **kwargs
        )
        self.start, self.endless = start, endless

    def __iter__(self):
        epoch, batch = self.start()
        while True:
            self.dataset.prepare_epoch(epoch, batch)
            batches = super().__iter__()
            # every batch of the pass is taken (none is discarded by a restart of the workers),
            # so every shared-memory slot a worker lends comes back (ShardDataset.track)
            yield from map(self.dataset.track, batches) if self.num_workers else batches
            if not self.endless:
                return
            epoch, batch = epoch + 1, 0

    def state_dict(self) -> dict:  # tells Lightning this loader resumes mid-epoch: the DataModule's
        return {}  # state_dict holds the position (MagiDataModule.load_state_dict)

    def load_state_dict(self, state: dict) -> None:
        pass


def _init_worker(_: int) -> None:
    # the DataLoader workers are the parallelism; intra-op threads would oversubscribe the cores
    torch.set_num_threads(1)
    # A stop signal sent to the whole process group (SLURM, kill -TERM -PGID) is the main process's
    # to act on (checkpoint, then shut the workers down): a worker it killed would make PyTorch
    # raise "DataLoader worker ... killed by signal" in the main process before the checkpoint.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class MagiDataModule(L.LightningDataModule):
    """Training batches following the data contract (docs/data.md).

    mode: "latent" (precomputed latents + text embeddings) or "raw" (pixels and waveforms; encode
        them on the device with `magitrain.data.encode_raw_batch`).
    shards: brace pattern / glob / list of them; or datasets: [{shards, weight, name}] to mix.
    buckets: [{height, width, seconds | frames, batch_size}].
    missing_audio, av_mismatch, av_tolerance: the audio policies (magitrain.data.span.AVPolicy).
    max_pixels: raw videos and reference images with more pixels (from their headers) are bad samples.
    voice_reference: {p, p_drop, source, min_seconds, max_seconds} (magitrain.data.voice).
    pin_memory: None pins batches when CUDA is available.
    rank / world_size: taken from the Trainer when attached, else torch.distributed, else these.
    The defaults are conf/data/latent.yaml's (a test keeps them equal).
    """

    def __init__(
        self,
        mode: str = "latent",
        shards: str | list[str] | None = None,
        datasets: list[Mapping] | None = None,
        buckets: list[Mapping] | None = None,
        num_workers: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        text_max_len: int = 640,
        sample_rate: int = 51200,
        audio_channels: int = 2,
        missing_audio: str = "mask",
        av_mismatch: str = "crop",
        av_tolerance: float = 0.5,
        random_offset: bool = False,
        max_pixels: int = 33177600,
        max_bad_fraction: float = 0.05,
        bad_check_after: int = 100,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        strict_resume: bool = True,
        voice_reference: Mapping = VOICE_OFF,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.mode, self.num_workers, self.seed = mode, num_workers, seed
        self.dataset_specs = parse_datasets(shards, datasets)
        self.buckets = parse_buckets(buckets or [])
        self.plan_options = {
            "seed": seed,
            "shuffle": shuffle,
            "shuffle_buffer": shuffle_buffer,
            "text_max_len": text_max_len,
        }
        policy = AVPolicy(av_mismatch, av_tolerance, missing_audio)
        self.raw = RawOptions(sample_rate, audio_channels, policy, random_offset, max_pixels=max_pixels)
        self.loader_options = {
            "prefetch_factor": prefetch_factor if num_workers else None,
            "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        }
        self.rank, self.world_size, self.strict_resume = rank, world_size, strict_resume
        self.voice = VoiceReference(**voice_reference)
        self.position = DataPosition()
        self.quality = BadInputTracker(max_bad_fraction, bad_check_after)
        self.dataset: ShardDataset | None = None
        self.plan_fingerprint: dict = {}  # set by setup(): saved with the position, checked on resume

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            # the data-parallel rank: context-parallel ranks of one group read the same batches
            replicas = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
            if replicas:
                return replicas["rank"], replicas["num_replicas"]
            return self.trainer.global_rank, self.trainer.world_size
        if self.rank is not None or self.world_size is not None:
            return self.rank or 0, self.world_size or 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        rank, world = self._rank_and_world()
        if not 0 <= rank < world:
            raise ValueError(f"data.rank={rank} is outside data.world_size={world}")
        self.dataset = ShardDataset(
            self.dataset_specs,
            self.buckets,
            self.mode,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            raw=self.raw,
            prefetch_factor=self.loader_options["prefetch_factor"] or 2,
            voice=self.voice,
            **self.plan_options,
        )
        self.quality.unplanned = self.dataset.unplanned_summary()
        self.plan_fingerprint = self.dataset.fingerprint()

    def train_dataloader(self) -> EpochLoader:
        """The training stream: endless under a Trainer (which `trainer.max_steps` stops), else the
        rest of the current data epoch per iter()."""
        self.setup()
        if self.trainer is not None and self.trainer.max_steps < 0:
            raise ValueError(
                "the training data stream is endless (data epochs follow each other within one "
                "Lightning epoch): set trainer.max_steps"
            )
        return EpochLoader(
            self.dataset,
            self._start,
            num_workers=self.num_workers,
            endless=self.trainer is not None,
            worker_init_fn=_init_worker,
            # the workers' base seed from a generator of its own, not a draw from the global RNG:
            # a resume restores that RNG before this loader's first iter(), so a draw there would
            # put training one draw ahead of the uninterrupted run (dropout, other global draws)
            generator=torch.Generator().manual_seed(self.seed),
            **self.loader_options,
        )

    def _start(self) -> tuple[int, int]:
        return self.position.next_batch(self.dataset.batches_in_epoch)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count a consumed training batch and its bad samples; strip the private `_data` entry."""
        if isinstance(batch, dict) and "_data" in batch:
            batch = dict(batch)
            meta = batch.pop("_data")
            self.position.take(meta["epoch"], meta["batch"])
            self.quality.update(meta["bad"], meta["notes"], meta["seen"])
        return batch

    def state_dict(self) -> dict:
        if self.dataset is None:
            return {}
        return {
            "version": STATE_VERSION,
            **self.position.state_dict(self.plan_fingerprint),
            "quality": self.quality.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        self.setup()  # the plan: its fingerprint is checked against the saved one
        self.position.load_state_dict(state, self.plan_fingerprint, self.strict_resume)
        self.quality.load_state_dict(state["quality"])
