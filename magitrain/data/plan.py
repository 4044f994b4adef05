"""The epoch plan: which samples, in which batches, on which rank and worker, from metadata only.

Everything here is a pure function of (sidecar indexes, buckets, seed, epoch, world size, workers),
so every rank and worker computes the same plan independently, and a resumed run recomputes it
and skips the batches already consumed. Steps, for epoch e:

1. Stream. Each dataset contributes `weight` passes (a fractional pass is a seeded prefix);
   within a pass its shards are shuffled, then all shard segments of all datasets are shuffled
   together and concatenated. Samples without a bucket (too short, no matching latent size)
   are dropped here, before splitting, so they cannot unbalance the ranks.
2. Slots. The stream is cut into `world_size * num_workers` contiguous, equal (+-1) ranges;
   slot = rank * num_workers + worker. Contiguous ranges keep reads sequential (a slot opens
   few shards) and work with fewer shards than slots (a shard is then shared by several slots,
   each reading only its part). With fewer samples than slots a slot repeats one sample.
3. Batches. A slot runs its range through a seeded shuffle buffer, then a bucket batcher (a
   batch is emitted when a bucket holds batch_size samples; partial batches are flushed at the
   end). The number of batches per slot is order independent: sum over buckets of
   ceil(n / batch_size), so every slot knows every other slot's count.
4. Equal counts. A slot with fewer batches than the largest count splits its largest batches in
   two (same bucket, smaller batch) until it matches; only when every batch is a single sample
   are batches repeated. So every rank runs the same number of steps (no DDP hang) and, except
   in that degenerate case, every sample is seen exactly once per epoch.
"""

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from magitrain.data.buckets import Bucket

Item = tuple[int, int]  # (shard number, row in that shard's index)
Batch = tuple[int, list[Item]]  # (bucket number, items)


def seeded_rng(*parts) -> random.Random:
    """A generator seeded by a string (hashed with SHA-512): the same on every machine and run,
    unlike hash() of a tuple holding strings."""
    return random.Random("/".join(str(p) for p in parts))


@dataclass(frozen=True)
class EpochPlanner:
    shard_buckets: tuple[tuple[int, ...], ...]  # per shard, per index row: bucket number or -1
    shard_dataset: tuple[int, ...]  # per shard: its dataset number
    weights: tuple[float, ...]  # per dataset
    buckets: tuple[Bucket, ...]
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256

    def stream(self, epoch: int) -> list[Item]:
        segments = []
        for d, weight in enumerate(self.weights):
            shards = [s for s, ds in enumerate(self.shard_dataset) if ds == d]
            eligible = sum(1 for s in shards for b in self.shard_buckets[s] if b >= 0)
            for p in range(math.ceil(weight)):
                order = list(shards)
                if self.shuffle:
                    seeded_rng(self.seed, epoch, "shards", d, p).shuffle(order)
                budget = round(min(1.0, weight - p) * eligible)
                for s in order:
                    rows = [r for r, b in enumerate(self.shard_buckets[s]) if b >= 0][:budget]
                    budget -= len(rows)
                    if rows:
                        segments.append([(s, r) for r in rows])
        if self.shuffle:
            seeded_rng(self.seed, epoch, "segments").shuffle(segments)
        return [item for seg in segments for item in seg]

    def slot_items(self, stream: Sequence[Item], slot: int, num_slots: int) -> list[Item]:
        n = len(stream)
        if n == 0:
            raise ValueError(
                "the epoch plan is empty: no sample of the configured shards fits a bucket "
                "(check data.buckets against the clips' durations and sizes)"
            )
        if n < num_slots:
            return [stream[slot % n]]
        return list(stream[slot * n // num_slots : (slot + 1) * n // num_slots])

    def num_batches(self, items: Sequence[Item]) -> int:
        counts = Counter(self.shard_buckets[s][r] for s, r in items)
        return sum(math.ceil(c / self.buckets[b].batch_size) for b, c in counts.items())

    def slot_batches(self, epoch: int, slot: int, num_slots: int) -> tuple[list[Item], list[Batch]]:
        """(the slot's items in read order, its batches in yield order), counts equalised."""
        stream = self.stream(epoch)
        target = self.batches_per_slot(stream, num_slots)
        items = self.slot_items(stream, slot, num_slots)
        batches = self._batch(self._shuffled(items, seeded_rng(self.seed, epoch, "buffer", slot)))
        return items, equalise(batches, target)

    def batches_per_slot(self, stream: Sequence[Item], num_slots: int) -> int:
        return max(self.num_batches(self.slot_items(stream, s, num_slots)) for s in range(num_slots))

    def _shuffled(self, items: list[Item], rng: random.Random) -> list[Item]:
        """A webdataset-style shuffle buffer: bounded memory, so reads stay sequential."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            return list(items)
        out, buf = [], []
        for item in items:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                out.append(buf.pop())
        rng.shuffle(buf)
        return out + buf

    def _batch(self, items: list[Item]) -> list[Batch]:
        pending: dict[int, list[Item]] = {}
        batches = []
        for s, r in items:
            b = self.shard_buckets[s][r]
            pending.setdefault(b, []).append((s, r))
            if len(pending[b]) == self.buckets[b].batch_size:
                batches.append((b, pending.pop(b)))
        batches.extend((b, rest) for b, rest in sorted(pending.items()))
        return batches


def equalise(batches: list[Batch], target: int) -> list[Batch]:
    """Split the largest batches until there are `target`; repeat batches only if none can split."""
    batches = list(batches)
    while len(batches) < target:
        i = max(range(len(batches)), key=lambda j: (len(batches[j][1]), j))
        bucket, items = batches[i]
        if len(items) < 2:
            break
        half = len(items) // 2
        batches[i : i + 1] = [(bucket, items[:half]), (bucket, items[half:])]
    n = len(batches)
    batches.extend(batches[i % n] for i in range(target - n))
    return batches
