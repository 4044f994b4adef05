"""The iterable dataset: runs one slot of the epoch plan (plan.py) inside a DataLoader worker.

Each yielded batch carries a private `_data` entry (epoch, slot, batch index, and since the
previous batch: bad samples, samples kept with a fix such as a silent track, samples attempted);
the DataModule pops it in the main process to track the resume position and the bad-input
fraction, so the training step never sees it.
"""

import logging
from collections import Counter
from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from magitrain.data.buckets import Bucket, assign_latent, assign_raw
from magitrain.data.collate import collate_latent, collate_raw
from magitrain.data.decode import BadSample, RawOptions, decode_latent, decode_raw
from magitrain.data.index import ShardIndex, build_index, read_index
from magitrain.data.plan import Batch, EpochPlanner, Item, seeded_rng
from magitrain.data.shards import DatasetSpec, index_url, iter_tar

log = logging.getLogger(__name__)
MODES = ("raw", "latent")


def load_indexes(urls: list[str]) -> list[ShardIndex]:
    indexes = []
    for url in urls:
        try:
            indexes.append(read_index(url, index_url(url)))
        except FileNotFoundError:
            indexes.append(build_index(url))
    return indexes


def row_bucket(buckets: list[Bucket], mode: str, row: dict) -> int:
    if mode == "latent":
        return assign_latent(buckets, tuple(row["latent_shape"]))
    return assign_raw(buckets, row["width"], row["height"], row["duration"])


class ShardDataset(IterableDataset):
    """Bucketed batches of one rank; `epoch` and `start_batch` are set by the DataModule before
    each `iter()` (the workers receive a fresh copy of this object every epoch)."""

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
    ):
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.buckets, self.text_max_len = mode, list(buckets), text_max_len
        self.raw = raw or RawOptions()
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.start_batch = 0, 0
        self._lengths: dict[int, int] = {}
        self.urls = [url for d in datasets for url in d.urls]
        self.indexes = load_indexes(self.urls)
        for index in self.indexes:
            if index.kind != mode:
                raise ValueError(f"shard {index.url} holds {index.kind} samples but data.mode={mode!r}")
        shard_buckets = tuple(
            tuple(row_bucket(self.buckets, mode, row) for row in ix.rows) for ix in self.indexes
        )
        self.unbucketed = sum(b < 0 for bs in shard_buckets for b in bs)
        if self.unbucketed:
            log.info(
                "%d samples fit no bucket (too short or another latent size) and are not planned",
                self.unbucketed,
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

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        if self.epoch not in self._lengths:  # Lightning asks often; the plan is O(samples)
            stream = self.planner.stream(self.epoch)
            per_slot = self.planner.batches_per_slot(stream, self.world_size * self.workers)
            self._lengths = {self.epoch: self.workers * per_slot}
        return self._lengths[self.epoch]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(
                f"ShardDataset planned for {self.workers} workers but runs in {workers}: "
                "pass the DataLoader's num_workers to the dataset"
            )
        # rotate roles so that, after a resume at batch k, the DataLoader's round robin (which
        # restarts at worker 0) continues with the slot that batch k belongs to
        local = (worker + self.start_batch) % workers
        slot = self.rank * workers + local
        items, batches = self.planner.slot_batches(self.epoch, slot, self.world_size * workers)
        first = (self.start_batch - local + workers - 1) // workers
        log.debug("epoch %d slot %d: %d batches, resuming at %d", self.epoch, slot, len(batches), first)
        yield from self._run(slot, items, batches, first)

    def _run(self, slot: int, items: list[Item], batches: list[Batch], first: int) -> Iterator[dict]:
        remaining = batches[first:]
        if not remaining:  # resumed right after this worker's last batch of the epoch
            return
        needed = Counter(item for _, batch_items in remaining for item in batch_items)
        fetch = _Fetcher(self._read(items, needed), needed)
        bad, notes, seen, last, owed = [], [], 0, None, 0
        for i, (bucket, batch_items) in enumerate(remaining, start=first):
            good = []
            for item in batch_items:
                seen += 1
                try:
                    good.append(self._decode(item, fetch(item), bucket))
                except Exception as exn:  # nothing a sample holds may kill the worker
                    bad.append(self._report(item, exn))
                    continue
                if good[-1].pop("audio_silenced", False):
                    notes.append((good[-1]["key"], self.urls[item[0]], "audio_silenced"))
            if good:
                last, repeats, owed = self._collate(good), 1 + owed, 0
            elif last is None:
                owed += 1  # a whole batch was bad before any good one: pay it back with the next
                continue
            else:
                repeats = 1  # keep the batch count (every rank must step equally): reuse the last batch
            for _ in range(repeats):
                yield {
                    **last,
                    "_data": {
                        "epoch": self.epoch,
                        "slot": slot,
                        "index": i,
                        "bad": bad,
                        "notes": notes,
                        "seen": seen,
                    },
                }
                bad, notes, seen = [], [], 0
        if last is None:
            raise RuntimeError(
                f"epoch {self.epoch}, slot {slot}: every sample was bad ({len(bad)} of them, "
                f"first: {bad[:3]}); see the warnings above"
            )

    def _report(self, item: Item, exn: Exception) -> tuple[str, str, str]:
        if not isinstance(exn, BadSample):
            exn = BadSample("decode_error", f"{type(exn).__name__}: {exn}")
        key, url = self.indexes[item[0]].rows[item[1]]["key"], self.urls[item[0]]
        log.warning("bad sample %s in %s: %s", key, url, exn)
        return key, url, exn.reason

    def _read(self, items: list[Item], needed: Counter) -> Iterator[tuple[Item, dict | BadSample]]:
        """The needed items in read order, each as its sample dict or a BadSample saying why it is
        missing. Shards with nothing needed (already consumed before a resume) are not opened."""
        for shard, rows in _runs(items):
            want = {self.indexes[shard].rows[r]["key"]: r for r in rows if needed[(shard, r)]}
            error = None
            for sample in iter_tar(self.urls[shard]) if want else ():
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

    def _decode(self, item: Item, sample: dict | BadSample, bucket: int) -> dict:
        if isinstance(sample, BadSample):
            raise sample
        shard, row = item
        if self.mode == "latent":
            return decode_latent(sample, self.buckets[bucket], self.text_max_len)
        rng = seeded_rng(self.planner.seed, self.epoch, "offset", sample["__key__"])
        return decode_raw(sample, self.indexes[shard].rows[row], self.buckets[bucket], self.raw, rng)

    def _collate(self, samples: list[dict]) -> dict:
        if self.mode == "latent":
            return collate_latent(samples)
        return collate_raw(samples, self.raw.sample_rate)


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
