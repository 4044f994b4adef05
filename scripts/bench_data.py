#!/usr/bin/env python
"""Data loading throughput on this machine: raw decode + resize and latent loading.

raw: 5 s clips (H.264 + AAC 44.1 kHz, generated with PyAV) decoded the way the raw loader does:
     decord at 25 fps, cover-resize + centre-crop to the 256x448 bucket (125 frames), audio
     resampled to 51.2 kHz; timed per clip in one process (= per core), then through the
     DataModule with --workers DataLoader workers (tar reading and collation included).
latent: 5 s latent samples at 256p (video [48, 32, 16, 28] and audio [125, 64] in bf16, text
     [L, 3584] bf16) read through the DataModule with --workers workers and in the main process
     (page-cache-warm files).

    python scripts/bench_data.py --clips 8 --latent-samples 256 --workers 2
"""

import argparse
import os
import platform
import random
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from magitrain.data.buckets import Bucket
from magitrain.data.datamodule import MagiDataModule
from magitrain.data.decode import RawOptions, decode_raw
from magitrain.data.index import read_index
from magitrain.data.shards import index_url, iter_tar
from magitrain.data.synthetic import make_clip, make_latent_dataset
from magitrain.data.writer import write_shard

BUCKET = {"height": 256, "width": 448, "seconds": 5}


def make_raw_shard(out: Path, clips: int, source: tuple[int, int]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(clips):
        make_clip(out / "clip.mp4", seconds=5.2, size=source, audio="tone", sample_rate=44100, seed=i)
        members = {
            "__key__": f"clip{i:04d}",
            "mp4": (out / "clip.mp4").read_bytes(),
            "json": b'{"caption": "a benchmark clip", "language": "en"}',
        }
        row = {"duration": 5.2, "width": source[1], "height": source[0], "fps": 25.0, "has_audio": True}
        samples.append((members, row))
    return write_shard(out, 0, "raw", samples)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_raw_per_core(tar: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per clip in one process with one thread, after one warm-up clip."""
    torch.set_num_threads(1)
    rows = {row["key"]: row for row in read_index(str(tar), index_url(str(tar))).rows}
    bucket, opts = Bucket(256, 448, 125, 1), RawOptions()
    samples = list(iter_tar(str(tar)))
    decode_raw(samples[0], rows[samples[0]["__key__"]], bucket, opts, random.Random(0))
    wall, cpu = time.perf_counter(), cpu_seconds()
    for sample in samples:
        out = decode_raw(sample, rows[sample["__key__"]], bucket, opts, random.Random(0))
    assert out["video"].shape == (3, 125, 256, 448) and out["audio"].shape == (2, 124 * 2048)
    return (time.perf_counter() - wall) / len(samples), (cpu_seconds() - cpu) / len(samples)


def bench_loader(shards: str, mode: str, batch_size: int, workers: int) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of all processes) for one epoch through the DataModule,
    worker start-up included."""
    dm = MagiDataModule(
        mode=mode,
        shards=shards,
        buckets=[{**BUCKET, "batch_size": batch_size}],
        num_workers=workers,
        shuffle_buffer=16,
    )
    loader = dm.train_dataloader()
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for batch in loader:
        count += len(batch["key"])
    wall = time.perf_counter() - wall
    del batch
    return count, wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=8, help="raw clips (5 s each)")
    parser.add_argument("--source", default="256x448", help="HxW of the generated source clips")
    parser.add_argument("--latent-samples", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    source = tuple(int(v) for v in args.source.split("x"))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        tar = make_raw_shard(tmp / "raw", args.clips, source)
        per_clip, per_clip_cpu = bench_raw_per_core(tar)
        raw = bench_loader(str(tar), "raw", 1, args.workers)
        make_latent_dataset(
            tmp / "latent",
            args.latent_samples,
            per_shard=64,
            latent_shapes=((32, 16, 28),),
            text_dim=3584,
            text_lengths=(60, 160),
            dtype=torch.bfloat16,
        )
        latent = bench_loader(str(tmp / "latent" / "*.tar"), "latent", 8, args.workers)
        # in the main process: no worker hand-over, whose shared-memory batches cost more CPU than
        # reading them on this VM (page faults on fresh shm); a step of a real model hides the rest
        latent_main = bench_loader(str(tmp / "latent" / "*.tar"), "latent", 8, 0)

    machine = platform.processor() or platform.machine()
    print(
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} during the run; {args.workers} DataLoader workers"
    )
    print(
        f"raw decode+resize+audio, 5 s {args.source} clip -> 256x448x125 + 51.2 kHz stereo, one core: "
        f"{per_clip:.3f} s wall, {per_clip_cpu:.3f} s CPU per clip "
        f"({1 / per_clip_cpu:.2f} clips per CPU-second)"
    )
    runs = (
        (f"raw, {args.workers} workers", "clips", raw),
        (f"latent (batch 8), {args.workers} workers", "samples", latent),
        ("latent (batch 8), main process", "samples", latent_main),
    )
    for name, unit, (n, wall, cpu) in runs:
        print(
            f"{name} through the DataModule: {n} {unit} in {wall:.2f} s wall = {n / wall:.1f} {unit}/s; "
            f"{cpu:.2f} CPU-s = {n / cpu:.1f} {unit} per CPU-second"
        )


if __name__ == "__main__":
    main()
