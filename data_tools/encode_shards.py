#!/usr/bin/env python
"""Raw shards -> latent shards with the frozen codecs (format: docs/data.md).

Each clip is decoded and cut exactly as the raw loader does (25 fps, cover-resize + centre crop
to its bucket, 4k+1 frames, matching audio), encoded by the video VAE, the audio VAE and the text
encoder, and written as KEY.latents.safetensors + KEY.json, keeping the raw shard's keys. Shards
are split across ranks (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS): shard i
goes to rank i % world. A finished output shard is skipped, so re-running resumes.
--sr HxW makes SR pairs: video_latent at the SR size, lr_video_latent at the bucket size.

    python data_tools/encode_shards.py 'shards/raw/*.tar' shards/latent/ codecs=magihuman \\
        codecs.video_vae_path=/ckpt/wan22_vae ... --bucket 256x448:5 --bucket 256x448:2
    torchrun --nproc-per-node 8 data_tools/encode_shards.py ...   # one GPU per rank
"""

import argparse
import os
import random
from collections import Counter
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.progress import track

from magitrain.data.buckets import Bucket, assign_raw, frames_for_seconds
from magitrain.data.collate import collate_raw
from magitrain.data.decode import BadSample, RawOptions, decode_raw, read_meta
from magitrain.data.encode import encode_raw_batch, to_pixels
from magitrain.data.index import read_index
from magitrain.data.shards import expand_urls, index_url, iter_tar
from magitrain.data.writer import latent_sample, shard_path, write_shard

CONF = Path(__file__).resolve().parents[1] / "conf" / "codecs"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def rank_and_world() -> tuple[int, int]:
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ:
            return int(os.environ[rank]), int(os.environ.get(world, 1))
    return 0, 1


def load_codecs(overrides: list[str], device: str):
    """`codecs=NAME` picks conf/codecs/NAME.yaml (or a yaml path); `codecs.FIELD=VALUE` overrides."""
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("codecs=")), None)
    if name is None:
        raise SystemExit("name the codecs: codecs=magihuman (conf/codecs/NAME.yaml) or codecs=PATH.yaml")
    path = Path(name) if name.endswith(".yaml") else CONF / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    fields = [o.removeprefix("codecs.") for o in overrides if o.startswith("codecs.")]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(fields))
    return instantiate(cfg).to(device)


def parse_bucket(text: str) -> Bucket:
    """`HxW:SECONDS` -> a bucket (batch size is irrelevant here)."""
    size, seconds = text.split(":")
    height, width = (int(v) for v in size.lower().split("x"))
    return Bucket(height, width, frames_for_seconds(float(seconds)), 1)


def encode_sample(
    sample: dict,
    row: dict,
    bucket: Bucket,
    sr: tuple[int, int] | None,
    codecs,
    opts: RawOptions,
    dtype: torch.dtype,
    device: str,
) -> tuple[dict, dict]:
    decoded = decode_raw(sample, row, bucket, opts, random.Random(0))
    batch = collate_raw([decoded], opts.sample_rate)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    latents = encode_raw_batch(batch, codecs)
    n = int(latents["text_len"][0])
    tensors = {
        "video_latent": latents["video_latent"][0].to(dtype).cpu(),
        "audio_latent": latents["audio_latent"][0].to(dtype).cpu(),
        "text_emb": latents["text_emb"][0, :n].cpu(),
    }
    if "ref_latent" in latents:  # from KEY.jpg, at the bucket size
        tensors["ref_latent"] = latents["ref_latent"][0].to(dtype).cpu()
    if sr is not None:
        high = decode_raw(sample, row, Bucket(sr[0], sr[1], bucket.frames, 1), opts, random.Random(0))
        tensors["lr_video_latent"] = tensors["video_latent"]
        pixels = to_pixels(high["video"][None].to(device))
        tensors["video_latent"] = codecs.video.encode(pixels)[0].to(dtype).cpu()
    meta = {
        **read_meta(sample),
        "bucket": bucket.name,
        "frames": bucket.frames,
        "duration": bucket.seconds,
        "width": (sr or (bucket.height, bucket.width))[1],
        "height": (sr or (bucket.height, bucket.width))[0],
    }
    return latent_sample(sample["__key__"], meta, tensors)


def encode_shard(
    url: str, number: int, out_dir: Path, buckets: list[Bucket], args, codecs, problems: Counter
) -> None:
    index = read_index(url, index_url(url))
    rows = {row["key"]: row for row in index.rows}
    opts = RawOptions(missing_audio=args.missing_audio)
    sr = tuple(int(v) for v in args.sr.lower().split("x")) if args.sr else None

    def samples():
        for sample in track(iter_tar(url), total=len(rows), description=f"{Path(url).name}"):
            if "__error__" in sample:
                problems["truncated_tar"] += 1
                print(f"{url}: {sample['__error__']}")
                return
            row = rows.get(sample["__key__"])
            choice = assign_raw(buckets, row["width"], row["height"], row["duration"]) if row else -1
            if choice < 0:
                problems["no_bucket" if row else "not_in_index"] += 1
                continue
            try:
                yield encode_sample(
                    sample, row, buckets[choice], sr, codecs, opts, DTYPES[args.dtype], args.device
                )
            except BadSample as exn:
                problems[exn.reason] += 1
                print(f"{url}:{sample['__key__']} skipped: {exn}")

    write_shard(out_dir, number, "latent", samples())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="raw shards: brace pattern, glob, or folder (all *.tar in it)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="codecs=NAME and codecs.FIELD=VALUE")
    parser.add_argument(
        "--bucket",
        action="append",
        default=[],
        help="HxW:SECONDS, repeatable (default 256x448:5 and 256x448:2)",
    )
    parser.add_argument("--sr", help="HxW: also encode at this size (SR pairs, e.g. 512x896)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="storage dtype of video/audio latents (text keeps the encoder's)",
    )
    parser.add_argument("--missing-audio", choices=["silent", "skip"], default="silent")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    args = parser.parse_args(argv)

    rank, world = rank_and_world()
    if args.device is None:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    pattern = str(Path(args.input) / "*.tar") if Path(args.input).is_dir() else args.input
    urls = expand_urls(pattern)
    buckets = [parse_bucket(b) for b in args.bucket or ["256x448:5", "256x448:2"]]
    mine = [(n, url) for n, url in enumerate(urls) if n % world == rank]
    todo = [(n, url) for n, url in mine if not shard_path(args.out_dir, n).exists()]
    print(f"rank {rank}/{world}: {len(mine)} shards, {len(mine) - len(todo)} already encoded")
    codecs = load_codecs(args.overrides, args.device) if todo else None
    problems: Counter = Counter()
    for number, url in todo:
        encode_shard(url, number, args.out_dir, buckets, args, codecs, problems)
    print(f"rank {rank}: done; skipped samples: {dict(problems) or 'none'}")


if __name__ == "__main__":
    main()
