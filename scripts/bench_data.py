#!/usr/bin/env python
"""Data loading throughput on this machine: raw decode + resize and latent loading.

raw: 5 s clips (H.264 + AAC 44.1 kHz, generated with PyAV) decoded the way the raw loader does:
     decord at 25 fps, cover-resize + centre-crop to the 256x448 bucket (125 frames), audio
     resampled to 51.2 kHz; timed per clip in one process (= per core), then through the
     DataModule with --workers DataLoader workers (tar reading and collation included).
latent: 5 s latent samples at 256p (video [48, 32, 16, 28] and audio [125, 64] in bf16, text
     [L, 3584] bf16) read through the DataModule in the main process and with --workers
     persistent workers, side by side: --rounds rounds, each timing --epochs epochs of one and
     then the other (page-cache-warm files; the first epoch, which starts the workers, is timed
     apart). Reported: samples/s (wall) and CPU ms per sample summed over all processes, the
     median over rounds. On a shared machine the CPU per sample is the steadier figure.

    python scripts/bench_data.py --clips 8 --latent-samples 128 --workers 2 --rounds 3
"""

import argparse
import contextlib
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
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
    assert out["video"].shape == (3, 125, 256, 448) and out["audio"].shape == (2, 125 * 2048)
    return (time.perf_counter() - wall) / len(samples), (cpu_seconds() - cpu) / len(samples)


def process_cpu() -> float:
    """CPU seconds of this process and its live children (persistent DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def bench_loader(shards: str, mode: str, batch_size: int, workers: int, epochs: int = 1):
    """[(samples, wall s, CPU s of all processes)] per epoch through the DataModule; the first
    epoch includes starting the workers. The batch is dropped after each step, as training does."""
    dm = MagiDataModule(
        mode=mode,
        shards=shards,
        buckets=[{**BUCKET, "batch_size": batch_size}],
        num_workers=workers,
        shuffle_buffer=16,
    )
    loader, out = dm.train_dataloader(), []
    for _ in range(epochs):
        wall, cpu, count = time.perf_counter(), process_cpu(), 0
        for batch in loader:
            count += len(dm.on_before_batch_transfer(batch, 0)["key"])
            del batch
        out.append((count, time.perf_counter() - wall, process_cpu() - cpu))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=8, help="raw clips (5 s each)")
    parser.add_argument("--source", default="256x448", help="HxW of the generated source clips")
    parser.add_argument("--latent-samples", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (latent)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (latent)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    source = tuple(int(v) for v in args.source.split("x"))
    torch.set_num_threads(1)  # as the DataLoader workers run; more threads only contend here

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        tar = make_raw_shard(tmp / "raw", args.clips, source)
        per_clip, per_clip_cpu = bench_raw_per_core(tar)
        (raw,) = bench_loader(str(tar), "raw", 1, args.workers)
        make_latent_dataset(
            tmp / "latent",
            args.latent_samples,
            per_shard=32,
            latent_shapes=((32, 16, 28),),
            text_dim=3584,
            text_lengths=(60, 160),
            dtype=torch.bfloat16,
        )
        shards = str(tmp / "latent" / "*.tar")
        runs = {0: [], args.workers: []}
        for _ in range(args.rounds):
            for workers in runs:
                runs[workers].append(bench_loader(shards, "latent", 8, workers, args.epochs))

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
    n, wall, cpu = raw
    print(
        f"raw, {args.workers} workers, through the DataModule (worker start included): {n} clips in "
        f"{wall:.2f} s = {n / wall:.1f} clips/s; {cpu / n * 1e3:.0f} CPU-ms per clip"
    )
    for workers, rounds in runs.items():
        first = [r[0] for r in rounds]
        later = [epoch for r in rounds for epoch in r[1:]]
        name = "main process" if workers == 0 else f"{workers} workers"
        print(
            f"latent (batch 8), {name}: first epoch {rate(first)}; later epochs {rate(later)} "
            f"(median of {len(later)} epochs in {args.rounds} alternating rounds)"
        )


def rate(epochs: list[tuple[int, float, float]]) -> str:
    speed = statistics.median(n / wall for n, wall, _ in epochs)
    cpu = statistics.median(cpu / n * 1e3 for n, _, cpu in epochs)
    return f"{speed:.0f} samples/s, {cpu:.2f} CPU-ms per sample"


if __name__ == "__main__":
    main()
