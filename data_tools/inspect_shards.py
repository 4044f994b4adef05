#!/usr/bin/env python
"""Counts and histograms of webdataset shards, and a --validate mode that decodes every sample.

Statistics come from the sidecar indexes (a shard without one is scanned; --write-index saves
what the scan found). --validate reads every tar and decodes every sample the way the loader
does under the given audio policies (raw: every frame of the span both tracks cover, at 25 fps,
and its audio; latent: the safetensors payload, checked against the data contract) and lists
each bad sample with its reason; the exit status is 1 if any was found.

    python data_tools/inspect_shards.py 'shards/raw/{000000..000099}.tar' --validate
"""

import argparse
import json
import os
import random
import sys
from collections import Counter

from rich.console import Console
from rich.progress import track
from rich.table import Table

from magitrain.data.buckets import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, Bucket
from magitrain.data.decode import BadSample, RawOptions, decode_latent, decode_raw
from magitrain.data.index import build_index, read_index, write_index
from magitrain.data.shards import expand_urls, index_url, iter_tar
from magitrain.data.span import AV_MISMATCH, MISSING_AUDIO, AVPolicy, Unplanned, clip_span

DURATION_BINS = (0, 2, 5, 10, 20, 30)


DURATION_LABELS = [f"{lo}-{hi} s" for lo, hi in zip(DURATION_BINS, DURATION_BINS[1:], strict=False)]
DURATION_LABELS.append(f">= {DURATION_BINS[-1]} s")


def duration_bin(seconds: float) -> str:
    for label, hi in zip(DURATION_LABELS, DURATION_BINS[1:], strict=False):
        if seconds < hi:
            return label
    return DURATION_LABELS[-1]


def load(url: str, write_missing: bool):
    try:
        return read_index(url, index_url(url))
    except FileNotFoundError:
        index = build_index(url)
        if write_missing:  # local shards only: the index goes beside the tar
            write_index(index_url(url), index.kind, list(index.rows), os.path.getsize(url))
        return index


def summarise(indexes) -> dict:
    rows = [row for ix in indexes for row in ix.rows]
    return {
        "shards": len(indexes),
        "samples": len(rows),
        "bytes": sum(row.get("bytes", 0) for row in rows),
        "hours": round(sum(row.get("duration", 0) for row in rows) / 3600, 4),
        "kind": sorted({ix.kind for ix in indexes}),
        "duration": dict(Counter(duration_bin(row["duration"]) for row in rows if "duration" in row)),
        "resolution": dict(Counter(f"{row['width']}x{row['height']}" for row in rows if "width" in row)),
        "latent_shape": dict(
            Counter("x".join(map(str, row["latent_shape"])) for row in rows if "latent_shape" in row)
        ),
        "sr_pairs": sr_pair_coverage(rows),
        "language": dict(Counter(row.get("language") or "?" for row in rows)),
        "has_audio": dict(Counter(str(row["has_audio"]) for row in rows if "has_audio" in row)),
    }


def sr_pair_coverage(rows: list[dict]) -> dict:
    """Latent samples per "SR grid <- LR grid" (latent H x W) pair; "no LR" counts the unpaired ones."""
    pairs = Counter()
    for row in rows:
        if "latent_shape" not in row:
            continue
        hr = "x".join(map(str, row["latent_shape"][1:]))
        lr = row.get("lr_latent_shape")
        pairs[f"{hr} <- {'x'.join(map(str, lr[1:]))}" if lr else f"{hr} <- no LR"] += 1
    return dict(pairs) if any("no LR" not in k for k in pairs) else {}


def own_bucket(row: dict, policy: AVPolicy) -> Bucket:
    """A bucket at the sample's own size and the full span it trains on (span.py), so validation
    decodes all of it; raises Unplanned if the policies leave the clip out."""
    if "latent_shape" in row:
        t, h, w = row["latent_shape"]
        return Bucket(h * VAE_SPACE_STRIDE, w * VAE_SPACE_STRIDE, VAE_TIME_STRIDE * (t - 1) + 1, 1)
    span = clip_span(row, policy)
    if span.frames < VAE_TIME_STRIDE + 1:
        raise Unplanned("too_short", f"the usable span has {span.frames} frames at 25 fps")
    frames = (span.frames - 1) // VAE_TIME_STRIDE * VAE_TIME_STRIDE + 1
    return Bucket(max(16, row["height"] // 16 * 16), max(16, row["width"] // 16 * 16), frames, 1)


def validate(index, policy: AVPolicy) -> list[tuple[str, str, str]]:
    """(url, key, reason) of every sample of the shard that the loader would skip."""
    bad, rows = [], {row["key"]: row for row in index.rows}
    seen = set()
    for sample in iter_tar(index.url):
        if "__error__" in sample:
            bad.append((index.url, "-", f"truncated_tar: {sample['__error__']}"))
            break
        key = sample["__key__"]
        seen.add(key)
        row = rows.get(key)
        try:
            if row is None:
                raise BadSample("not_in_index")
            bucket = own_bucket(row, policy)
            if index.kind == "latent":
                decode_latent(sample, bucket, text_max_len=1 << 30, policy=policy)
            else:
                decode_raw(sample, row, bucket, RawOptions(policy=policy), random.Random(0))
        except (BadSample, Unplanned) as exn:
            bad.append((index.url, key, str(exn)))
    bad.extend((index.url, key, "missing_in_tar") for key in rows if key not in seen)
    return bad


def print_summary(console: Console, summary: dict) -> None:
    console.print(
        f"{summary['shards']} shards ({', '.join(summary['kind'])}), {summary['samples']} samples, "
        f"{summary['bytes'] / 1e9:.3f} GB, {summary['hours']} h"
    )
    for field in ("duration", "resolution", "latent_shape", "sr_pairs", "language", "has_audio"):
        if not summary[field]:
            continue
        table = Table(title=field, show_header=False)
        total = sum(summary[field].values())
        # duration bins in their natural order, everything else most frequent first
        order = (lambda kv: DURATION_LABELS.index(kv[0])) if field == "duration" else (lambda kv: -kv[1])
        for value, n in sorted(summary[field].items(), key=order):
            table.add_row(value, str(n), "#" * max(1, round(40 * n / total)))
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", nargs="+", help="brace patterns, globs or paths of .tar shards")
    parser.add_argument("--validate", action="store_true", help="decode every sample, list the bad ones")
    parser.add_argument("--write-index", action="store_true", help="save the index of shards that lack one")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--av-mismatch", choices=AV_MISMATCH, default="crop", help="as data.av_mismatch")
    parser.add_argument("--av-tolerance", type=float, default=0.5, help="seconds, as data.av_tolerance")
    parser.add_argument(
        "--missing-audio", choices=MISSING_AUDIO, default="mask", help="as data.missing_audio"
    )
    args = parser.parse_args(argv)
    policy = AVPolicy(args.av_mismatch, args.av_tolerance, args.missing_audio)

    console = Console(stderr=args.json)
    urls = expand_urls(args.shards)
    indexes = [
        load(url, args.write_index) for url in track(urls, description="reading indexes", console=console)
    ]
    report = {"summary": summarise(indexes)}
    if args.validate:
        report["bad"] = [
            b
            for ix in track(indexes, description="validating", console=console)
            for b in validate(ix, policy)
        ]
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(console, report["summary"])
        for url, key, reason in report.get("bad", []):
            console.print(f"BAD {url} {key}: {reason}")
        if args.validate:
            console.print(f"{len(report['bad'])} bad samples")
    return 1 if report.get("bad") else 0


if __name__ == "__main__":
    from magitrain.cli import command_line

    with command_line():
        sys.exit(main())
