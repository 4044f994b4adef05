"""The iterable dataset: runs one slot of the epoch plan (plan.py) in the main process or a worker.

The main process holds the indexes and plans. At the start of every epoch it hands each
DataLoader worker only its part of the plan (its batches and the index rows of their samples,
`WorkerPart`), through a small file the worker reads when its iterator restarts; the workers
are persistent, so they are started once per run, not once per epoch, and each writes its
batches into shared-memory buffers it reuses (collate.SharedRing).

Each yielded batch carries a private `_data` entry (epoch, slot, batch index, and since the
previous batch: bad samples, samples kept with a fix such as a masked audio track, samples
attempted); the DataModule pops it in the main process to track the resume position and the
bad-input fraction, so the training step never sees it.
"""

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import IterableDataset, get_worker_info

from magitrain.data.buckets import Bucket, assign_latent, assign_raw
from magitrain.data.collate import PADDED, SharedRing, collate_latent, collate_raw, release_when_dropped
from magitrain.data.decode import BadSample, RawOptions, decode_latent, decode_raw
from magitrain.data.index import ShardIndex, build_index, read_index
from magitrain.data.plan import Batch, EpochPlanner, Item, seeded_rng
from magitrain.data.shards import DatasetSpec, index_url, iter_tar
from magitrain.data.span import Unplanned, clip_span
from magitrain.data.voice import VoiceReference
from magitrain.errors import UserError

log = logging.getLogger(__name__)
MODES = ("raw", "latent")
EXAMPLES = 5


def load_indexes(urls: list[str]) -> list[ShardIndex]:
    indexes = []
    for url in urls:
        local = "://" not in url and not url.startswith("pipe:")
        if local and not os.path.exists(url):
            raise UserError(
                f"shard {url} does not exist"
                + (" (its index does)" if os.path.exists(index_url(url)) else "")
                + ": check data.shards / data.datasets"
            )
        try:
            indexes.append(read_index(url, index_url(url)))
        except FileNotFoundError:
            indexes.append(build_index(url))
    return indexes


@dataclass(frozen=True)
class WorkerPart:
    """What one worker runs in one epoch: its slot's batches from batch `first` on, and the index
    rows (with their shard urls) of the samples in them, nothing else."""

    epoch: int
    slot: int
    first: int
    items: list[Item]  # the slot's samples in read order
    batches: list[Batch]
    rows: dict[Item, dict]
    urls: dict[int, str]
    partners: dict[Item, Item] = field(default_factory=dict)  # same_speaker: the reference's clip


class ShardDataset(IterableDataset):
    """Bucketed batches of one rank; `prepare_epoch(epoch, start_batch)` is called by the
    DataModule before each `iter()`."""

    def __init__(
        self,
        datasets: list[DatasetSpec],
        buckets: list[Bucket],
        mode: str = "latent",
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        raw: RawOptions | None = None,
        text_max_len: int = 640,
        prefetch_factor: int = 2,
        voice: VoiceReference | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.buckets, self.text_max_len = mode, list(buckets), text_max_len
        self.raw = raw or RawOptions()
        self.voice = voice or VoiceReference()
        if self.voice.enabled and mode != "latent":
            raise ValueError("data.voice_reference needs data.mode=latent (latent shards, encode_shards.py)")
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.epoch, self.start_batch = 0, 0
        self._lengths: dict[int, int] = {}
        self.datasets = list(datasets)
        self.urls = [url for d in datasets for url in d.urls]
        self.indexes = load_indexes(self.urls)
        self.speakers = self._speakers() if self.voice.enabled and self.voice.source == "same_speaker" else {}
        for index in self.indexes:
            if index.kind != mode:
                raise ValueError(f"shard {index.url} holds {index.kind} samples but data.mode={mode!r}")
        self.text_dim = self._common_text_dim()
        self.unplanned: Counter[str] = Counter()
        self.unplanned_examples: dict[str, list[str]] = {}
        shard_buckets = tuple(tuple(self._plan_row(ix.url, row) for row in ix.rows) for ix in self.indexes)
        if self.unplanned:
            log.warning(
                "%d samples are not planned: %s", sum(self.unplanned.values()), self.unplanned_summary()
            )
        self.planner = EpochPlanner(
            shard_buckets=shard_buckets,
            shard_dataset=tuple(d for d, spec in enumerate(datasets) for _ in spec.urls),
            weights=tuple(spec.weight for spec in datasets),
            buckets=tuple(self.buckets),
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
        )
        self._parts_dir: str | None = None
        self._ring: SharedRing | None = None  # a worker's batch buffers (collate.py)
        self.ring_slots = prefetch_factor + 3
        self.ring_counts: torch.Tensor | None = None  # [workers, 2, slots], made before they start

    # ----- planning (main process) ----------------------------------------------------------
    def _common_text_dim(self) -> int | None:
        """The text width most latent rows have (index v2); samples of another width are bad_shape."""
        dims = Counter(row["text_dim"] for ix in self.indexes for row in ix.rows if "text_dim" in row)
        return dims.most_common(1)[0][0] if dims else None

    def _plan_row(self, url: str, row: dict) -> int:
        """The row's bucket, or -1 with the reason counted (too_short, av_mismatch, missing_audio,
        no_bucket)."""
        try:
            if self.mode == "latent":
                if not row.get("has_audio", True) and self.raw.policy.missing_audio == "drop":
                    raise Unplanned("missing_audio", "data.missing_audio=drop")
                bucket = assign_latent(self.buckets, tuple(row["latent_shape"]))
                if bucket < 0:
                    raise Unplanned("no_bucket", f"latent {row['latent_shape']}")
                return bucket
            span = clip_span(row, self.raw.policy)
            bucket = assign_raw(self.buckets, row["width"], row["height"], span.frames)
            if bucket < 0:
                raise Unplanned("too_short", f"{span.frames} usable frames")
            return bucket
        except Unplanned as exn:
            self.unplanned[exn.reason] += 1
            examples = self.unplanned_examples.setdefault(exn.reason, [])
            if len(examples) < EXAMPLES:
                examples.append(f"{url}:{row['key']}")
            return -1

    def _speakers(self) -> dict[str, list[Item]]:
        """Speaker id -> the clips (with audio) of the indexes that carry it."""
        speakers: dict[str, list[Item]] = {}
        for s, index in enumerate(self.indexes):
            for r, row in enumerate(index.rows):
                if "speaker" in row and row.get("has_audio", True):
                    speakers.setdefault(row["speaker"], []).append((s, r))
        if not speakers:
            raise ValueError(
                "data.voice_reference.source=same_speaker needs speaker ids in the shard indexes: give "
                "make_shards.py a speaker column (or NAME.json 'speaker') and encode the shards again"
            )
        return speakers

    def partner(self, epoch: int, item: Item) -> Item | None:
        """Another clip of the item's speaker (seeded by epoch and key), or None when it has none."""
        row = self.indexes[item[0]].rows[item[1]]
        others = [i for i in self.speakers.get(row.get("speaker"), ()) if i != item]
        if not others:
            return None
        return others[seeded_rng(self.seed, epoch, "speaker", row["key"]).randrange(len(others))]

    def unplanned_summary(self) -> str:
        return "; ".join(
            f"{reason}: {n} (e.g. {', '.join(self.unplanned_examples[reason])})"
            for reason, n in self.unplanned.most_common()
        )

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches this rank yields in data epoch `epoch` (the same on every rank; it differs
        between epochs when there are several buckets)."""
        if epoch not in self._lengths:  # asked at every resume and epoch; the plan is O(samples)
            stream = self.planner.stream(epoch)
            per_slot = self.planner.batches_per_slot(stream, self.world_size * self.workers)
            self._lengths = {epoch: self.workers * per_slot}
        return self._lengths[epoch]

    def fingerprint(self) -> dict[str, object]:
        """Everything the plan depends on, as plain values (saved with the data position): a
        resume under a different plan cannot continue at the saved batch."""
        p = self.planner
        shards = hashlib.sha256()
        for url, index in zip(self.urls, self.indexes, strict=True):
            shards.update(json.dumps([url.rsplit("/", 1)[-1], [row["key"] for row in index.rows]]).encode())
        planned = hashlib.sha256(json.dumps(p.shard_buckets).encode()).hexdigest()[:12]
        return {
            "seed": p.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle": p.shuffle,
            "shuffle_buffer": p.shuffle_buffer,
            "buckets": [f"{b.name} batch_size={b.batch_size}" for b in p.buckets],
            "datasets": [f"{d.name} weight={d.weight} ({len(d.urls)} shards)" for d in self.datasets],
            "shards": f"{len(self.urls)} shards, sha256 {shards.hexdigest()[:12]} of their names and keys",
            # which samples the buckets and the audio policies (missing_audio, av_mismatch,
            # av_tolerance) admit, and into which bucket
            "planned_samples": f"{sum(b >= 0 for row in p.shard_buckets for b in row)}, sha256 {planned}",
        }

    def part(self, worker: int) -> WorkerPart:
        """The part of the current epoch that worker `worker` of this rank runs.

        Roles are rotated so that, after a resume at batch k, the DataLoader's round robin (which
        restarts at worker 0) continues with the slot that batch k belongs to."""
        workers = self.workers
        local = (worker + self.start_batch) % workers
        slot = self.rank * workers + local
        items, batches = self.planner.slot_batches(self.epoch, slot, self.world_size * workers)
        first = (self.start_batch - local + workers - 1) // workers
        needed = {item for _, batch in batches[first:] for item in batch}
        partners = {item: self.partner(self.epoch, item) for item in needed} if self.speakers else {}
        partners = {item: other for item, other in partners.items() if other is not None}
        every = needed | set(partners.values())
        rows = {(s, r): self.indexes[s].rows[r] for s, r in every}
        urls = {s: self.urls[s] for s, _ in every}
        return WorkerPart(self.epoch, slot, first, items, batches, rows, urls, partners)

    def prepare_epoch(self, epoch: int, start_batch: int) -> None:
        """Set the epoch and first batch; with workers, write each worker's part for it to pick up."""
        self.epoch, self.start_batch = epoch, start_batch
        level = logging.INFO if start_batch else logging.DEBUG  # routine each epoch; worth saying on a resume
        n = self.batches_in_epoch(epoch)
        log.log(level, "data epoch %d: %d batches per rank, from batch %d", epoch, n, start_batch)
        if self.num_workers == 0:
            return
        if self.ring_counts is None:
            self.ring_counts = torch.zeros(
                self.num_workers, 2, self.ring_slots, dtype=torch.long
            ).share_memory_()
        if self._parts_dir is None:
            self._parts_dir = tempfile.mkdtemp(prefix="magitrain-plan-")
            weakref.finalize(self, _remove_dir, self._parts_dir, os.getpid())
        for worker in range(self.num_workers):
            path = self._part_path(worker)
            with open(f"{path}.tmp", "wb") as f:
                pickle.dump(self.part(worker), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(f"{path}.tmp", path)

    def _part_path(self, worker: int) -> str:
        return os.path.join(self._parts_dir, f"worker{worker}.pkl")

    def __getstate__(self) -> dict:
        # what a worker started with spawn receives: not the indexes, nor the planner (its part
        # comes through prepare_epoch's file)
        return {
            k: v for k, v in self.__dict__.items() if k not in ("indexes", "planner", "_lengths", "speakers")
        }

    # ----- running a part (worker or main process) ------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            if self.num_workers:
                raise RuntimeError(
                    "ShardDataset planned for DataLoader workers is iterated in the main process"
                )
            part = self.part(0)
        else:
            if info.num_workers != self.workers:
                raise RuntimeError(
                    f"ShardDataset planned for {self.workers} workers but runs in {info.num_workers}: "
                    "pass the DataLoader's num_workers to the dataset"
                )
            if self._ring is None:
                self._ring = SharedRing(self.ring_counts[info.id])
            with open(self._part_path(info.id), "rb") as f:
                part = pickle.load(f)
        log.debug(
            "epoch %d slot %d: %d batches, resuming at %d",
            part.epoch,
            part.slot,
            len(part.batches),
            part.first,
        )
        yield from self._run(part)

    def _run(self, part: WorkerPart) -> Iterator[dict]:
        remaining = part.batches[part.first :]
        if not remaining:  # resumed right after this worker's last batch of the epoch
            return
        needed = Counter(item for _, batch_items in remaining for item in batch_items)
        fetch = _Fetcher(self._read(part, needed), needed)
        bad, notes, seen, last, owed = [], [], 0, None, 0
        for i, (bucket, batch_items) in enumerate(remaining, start=part.first):
            good = []
            for item in batch_items:
                seen += 1
                try:
                    good.append((item, self._decode(part, item, fetch(item), bucket)))
                except Exception as exn:  # nothing a sample holds may kill the worker
                    bad.append(self._report(part, item, exn))
                    continue
                note = good[-1][1].pop("note", None)
                if note:
                    notes.append((good[-1][1]["key"], part.urls[item[0]], note))
            good = self._same_shapes(part, good, bad)
            if good:
                last, repeats, owed = self._collate(good), 1 + owed, 0
                ring = self._ring.slot if self._ring is not None else None  # its buffer slot
            elif last is None:
                owed += 1  # a whole batch was bad before any good one: pay it back with the next
                continue
            else:
                repeats = 1  # keep the batch count (every rank must step equally): reuse the last batch
            for r in range(i - repeats + 1, i + 1):
                meta = {
                    "epoch": part.epoch,
                    "slot": part.slot,
                    "batch": r * self.workers + part.slot % self.workers,  # in the rank's epoch
                    "bad": bad,
                    "notes": notes,
                    "seen": seen,
                }
                if ring is not None:  # the batch lives in a reusable buffer: lend it
                    self._ring.lend(ring)
                    meta["ring"] = (get_worker_info().id, ring)
                yield {**last, "_data": meta}
                bad, notes, seen = [], [], 0
        if last is None:
            raise RuntimeError(
                f"epoch {part.epoch}, slot {part.slot}: every sample was bad ({len(bad)} of them, "
                f"first: {bad[:3]}); see the warnings above"
            )

    def _same_shapes(self, part: WorkerPart, good: list, bad: list) -> list[dict]:
        """The last guard before torch.stack: samples whose tensor shapes (text length aside) differ
        from the batch's first sample are bad_shape (only possible for fields the contract checks
        leave open, e.g. the SR pair's low-resolution size or the text width of an old index)."""
        if not good:
            return []
        shapes = [_shapes(sample) for _, sample in good]
        kept = []
        for (item, sample), shape in zip(good, shapes, strict=True):
            if all(shape[k] == shapes[0][k] for k in shape.keys() & shapes[0].keys()):
                kept.append(sample)
            else:
                detail = f"shapes {shape} differ from the batch's {shapes[0]}"
                bad.append(self._report(part, item, BadSample("bad_shape", detail)))
        return kept

    def _report(self, part: WorkerPart, item: Item, exn: Exception) -> tuple[str, str, str, str]:
        if not isinstance(exn, BadSample):
            exn = BadSample("decode_error", f"{type(exn).__name__}: {exn}")
        key, url = part.rows[item]["key"], part.urls[item[0]]
        log.warning("bad sample %s in %s: %s", key, url, exn)
        return key, url, exn.reason, exn.detail

    def _read(self, part: WorkerPart, needed: Counter) -> Iterator[tuple[Item, dict | BadSample]]:
        """The needed items in read order, each as its sample dict or a BadSample saying why it is
        missing. Shards with nothing needed (already consumed before a resume) are not opened."""
        for shard, rows in _runs(part.items):
            want = {part.rows[(shard, r)]["key"]: r for r in rows if needed[(shard, r)]}
            offsets = [part.rows[(shard, r)].get("offset") for r in want.values()]
            start = 0 if None in offsets else min(offsets, default=0)  # an index written before offsets: 0
            error = None
            for sample in iter_tar(part.urls[shard], start, set(want)) if want else ():
                if "__error__" in sample:
                    error = sample["__error__"]
                    break
                r = want.pop(sample["__key__"], None)
                if r is not None:
                    yield (shard, r), sample
                if not want:
                    break
            reason = BadSample("truncated_tar", error) if error else BadSample("missing_in_tar")
            for r in sorted(want.values()):
                yield (shard, r), reason

    def _decode(self, part: WorkerPart, item: Item, sample: dict | BadSample, bucket: int) -> dict:
        if isinstance(sample, BadSample):
            raise sample
        if self.mode == "latent":
            partner = part.partners.get(item)  # same_speaker: the clip the reference comes from
            speaker_audio = None if partner is None else self._speaker_audio(part, partner)
            rng = seeded_rng(self.seed, part.epoch, "voice", sample["__key__"])
            return decode_latent(
                sample, self.buckets[bucket], self.text_max_len, self.text_dim, self.raw.policy,
                self.voice, rng, speaker_audio,
            )  # fmt: skip
        rng = seeded_rng(self.seed, part.epoch, "offset", sample["__key__"])
        return decode_raw(sample, part.rows[item], self.buckets[bucket], self.raw, rng)

    def _speaker_audio(self, part: WorkerPart, item: Item) -> torch.Tensor | None:
        """The audio latents of another clip of a speaker (same_speaker), read from its shard on its
        own; None (that sample then trains without a reference) when it cannot be read."""
        row, url = part.rows[item], part.urls[item[0]]
        for sample in iter_tar(url, row.get("offset") or 0, {row["key"]}):
            if sample.get("__key__") == row["key"] and "latents.safetensors" in sample:
                try:
                    return load_safetensors(sample["latents.safetensors"])["audio_latent"]
                except Exception as exn:  # noqa: BLE001  a bad partner costs a reference, not the sample
                    log.warning("voice reference %s in %s unreadable: %s", row["key"], url, exn)
                    return None
        log.warning("voice reference %s not found in %s", row["key"], url)
        return None

    def track(self, batch: dict) -> dict:
        """Main process, every batch a worker yields: return its buffer slot once it is dropped."""
        ring = batch.get("_data", {}).get("ring")
        if ring is not None:
            release_when_dropped(batch, self.ring_counts[ring[0]], ring[1])
        return batch

    def _collate(self, samples: list[dict]) -> dict:
        if self.mode == "latent":
            return collate_latent(samples, self._ring)
        return collate_raw(samples, self.raw.sample_rate, self._ring)


def _shapes(sample: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes that must agree within a batch (text's and voice references' lengths may differ)."""
    tensors = {k: v for k, v in sample.items() if torch.is_tensor(v)}
    return {k: tuple(v.shape[1:] if k in PADDED else v.shape) for k, v in tensors.items()}


def _remove_dir(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked worker that inherited the finalizer
        shutil.rmtree(path, ignore_errors=True)


class _Fetcher:
    """Hands out samples in batch order from a stream in read order, holding the ones that arrive
    early (the shuffle buffer's reach) until their batch comes; a sample needed twice (repeated
    batches in tiny datasets) is held until its last use."""

    def __init__(self, arrivals: Iterator[tuple[Item, dict | BadSample]], needed: Counter):
        self.arrivals, self.needed, self.held = arrivals, needed, {}

    def __call__(self, item: Item) -> dict | BadSample:
        while item not in self.held:
            got, sample = next(self.arrivals)
            self.held[got] = sample
        self.needed[item] -= 1
        return self.held[item] if self.needed[item] else self.held.pop(item)


def _runs(items: list[Item]) -> Iterator[tuple[int, list[int]]]:
    """Group consecutive items of the same shard: each group is one sequential pass over a tar."""
    shard, rows = None, []
    for s, r in items:
        if s != shard or (rows and r <= rows[-1]):
            if rows:
                yield shard, rows
            shard, rows = s, []
        rows.append(r)
    if rows:
        yield shard, rows
