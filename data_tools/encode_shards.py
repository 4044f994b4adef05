#!/usr/bin/env python
"""Raw shards -> latent shards with the frozen codecs (format: docs/data.md).

Each clip is planned and cut exactly as the raw loader does (the span both tracks cover under
--av-mismatch, 25 fps, cover-resize + centre crop to its bucket, 4k+1 frames, the F/25 s of audio
they cover), encoded by the video VAE, the audio VAE and the text encoder, and written as
KEY.latents.safetensors + KEY.json, keeping the raw shard's keys. A clip without audio is kept
(audio latent of silence, `has_audio: false` in KEY.json and the index, so that training's
data.missing_audio decides) unless --missing-audio drop. Shards
are split across ranks (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS): shard i
goes to rank i % world. A finished output shard is skipped, so re-running resumes. Clips of one
bucket (and the same presence of KEY.jpg) are encoded --batch-size at a time.
--sr HxW makes SR pairs: video_latent at the SR size, lr_video_latent from that clip resized to the
bucket size (no crop: the SR sampler stretches the base grid, e.g. 448x256 -> 1920x1088).
--prompts: INPUT is a text file of prompts (one a line, # comments) and the output is prompt
shards (magitrain/data/prompts.py): text embeddings + the geometry of each --bucket, no video or
audio, for data-free DMD-2; prompt i gets bucket i mod the number of buckets.

Both modes also write OUT_DIR/negative.safetensors, the codecs' negative prompt encoded once: DMD-2
runs without codecs read it as the teacher's unconditional prompt.

    python data_tools/encode_shards.py 'shards/raw/*.tar' shards/latent/ codecs=magihuman \\
        codecs.video_vae_path=/ckpt/wan22_vae ... --bucket 256x448:5 --bucket 256x448:2
    python data_tools/encode_shards.py --prompts prompts.txt shards/prompts/ codecs=magihuman ...
    torchrun --nproc-per-node 8 data_tools/encode_shards.py ...   # one GPU per rank
"""

import argparse
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.progress import track

from magitrain.codecs.media import to_pixels
from magitrain.data.buckets import Bucket, assign_raw, frames_for_seconds
from magitrain.data.collate import collate_raw
from magitrain.data.decode import BadSample, RawOptions, decode_raw, read_meta
from magitrain.data.encode import encode_raw_batch, resize_video
from magitrain.data.index import read_index
from magitrain.data.prompts import NEGATIVE_FILE, read_prompts, write_negative, write_prompt_shards
from magitrain.data.shards import expand_urls, index_url, iter_tar
from magitrain.data.span import AV_MISMATCH, AVPolicy, Unplanned, clip_span
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
    if "video_decoder" in cfg:
        cfg.video_decoder = "wan"  # encoding never decodes: no Turbo-VAED to load
    return instantiate(cfg).to(device)


def parse_bucket(text: str) -> Bucket:
    """`HxW:SECONDS` -> a bucket (batch size is irrelevant here)."""
    size, seconds = text.split(":")
    height, width = (int(v) for v in size.lower().split("x"))
    return Bucket(height, width, frames_for_seconds(float(seconds)), 1)


@dataclass(frozen=True)
class Job:
    """What every batch of this run shares."""

    codecs: object
    opts: RawOptions
    sr: tuple[int, int] | None
    dtype: torch.dtype
    device: str
    batch_size: int


def decode_sample(sample: dict, row: dict, bucket: Bucket, job: Job) -> dict:
    """The clip cut to its bucket (and, for SR pairs, also at the SR size) plus its metadata."""
    decoded = decode_raw(sample, row, bucket, job.opts, random.Random(0))
    decoded["meta"] = {**read_meta(sample), "has_audio": bool(decoded["audio_mask"])}
    if job.sr is not None:  # the LR clip is the HR clip resized (no crop), as SR training makes it
        high = Bucket(job.sr[0], job.sr[1], bucket.frames, 1)
        decoded["high"] = decode_raw(sample, row, high, job.opts, random.Random(0))["video"]
        decoded["video"] = resize_video(decoded["high"][None], (bucket.height, bucket.width))[0]
    return decoded


def encode_batch(decoded: list[dict], bucket: Bucket, job: Job) -> list[tuple[dict, dict]]:
    """Encode clips of one bucket together; (members, index row) per clip."""
    batch = collate_raw(decoded, job.opts.sample_rate)
    batch = {k: v.to(job.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    latents = encode_raw_batch(batch, job.codecs)
    video = latents["video_latent"]
    if job.sr is not None:
        high = to_pixels(torch.stack([d["high"] for d in decoded]).to(job.device))
        latents["lr_video_latent"], video = video, job.codecs.video.encode(high)
    height, width = job.sr or (bucket.height, bucket.width)
    out = []
    for i, d in enumerate(decoded):
        tensors = {"video_latent": video[i], "audio_latent": latents["audio_latent"][i]}
        tensors |= {k: latents[k][i] for k in ("ref_latent", "lr_video_latent") if k in latents}
        tensors = {k: v.to(job.dtype).cpu() for k, v in tensors.items()}
        tensors["text_emb"] = latents["text_emb"][i, : int(latents["text_len"][i])].cpu()
        meta = {
            **d["meta"],
            "bucket": bucket.name,
            "frames": bucket.frames,
            "duration": bucket.seconds,
            "width": width,
            "height": height,
        }
        out.append(latent_sample(d["key"], meta, tensors))
    return out


def encode_shard(url: str, number: int, out_dir: Path, buckets: list[Bucket], job: Job, problems: Counter):
    rows = {row["key"]: row for row in read_index(url, index_url(url)).rows}

    def samples():
        # clips wait per (bucket, has reference image) until a batch is full: one shape per batch
        pending: dict[tuple[int, bool], list[dict]] = {}
        for sample in track(iter_tar(url), total=len(rows), description=f"{Path(url).name}"):
            if "__error__" in sample:
                problems["truncated_tar"] += 1
                print(f"{url}: {sample['__error__']}")
                break
            row = rows.get(sample["__key__"])
            try:
                if row is None:
                    raise Unplanned("not_in_index", "the shard's index has no row for it")
                span = clip_span(row, job.opts.policy)
                choice = assign_raw(buckets, row["width"], row["height"], span.frames)
                if choice < 0:
                    raise Unplanned("too_short", f"{span.frames} usable frames fill no --bucket")
            except Unplanned as exn:
                problems[exn.reason] += 1
                print(f"{url}:{sample['__key__']} skipped: {exn}")
                continue
            try:
                decoded = decode_sample(sample, row, buckets[choice], job)
            except BadSample as exn:
                problems[exn.reason] += 1
                print(f"{url}:{sample['__key__']} skipped: {exn}")
                continue
            group = pending.setdefault((choice, "ref_image" in decoded), [])
            group.append(decoded)
            if len(group) == job.batch_size:
                yield from encode_batch(pending.pop((choice, "ref_image" in decoded)), buckets[choice], job)
        for (choice, _), group in pending.items():
            yield from encode_batch(group, buckets[choice], job)

    write_shard(out_dir, number, "latent", samples())


def encode_prompts(args, rank: int) -> None:
    """--prompts: rank 0 writes the prompt shards (one text encoder pass is cheap)."""
    prompts = read_prompts(args.input)  # a bad file fails before the codecs load
    if rank != 0:
        return
    buckets = [parse_bucket(b) for b in args.bucket or ["256x448:5"]]
    codecs = load_codecs(args.overrides, args.device)
    paths = write_prompt_shards(prompts, args.out_dir, codecs.text, buckets, per_shard=args.per_shard)
    print(f"{len(prompts)} prompts -> {len(paths)} prompt shards in {args.out_dir}")


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
    parser.add_argument(
        "--missing-audio",
        choices=["keep", "drop"],
        default="keep",
        help="clips without audio: keep (has_audio=false; training's data.missing_audio decides) or drop",
    )
    parser.add_argument(
        "--av-mismatch", choices=AV_MISMATCH, default="crop", help="as data.av_mismatch (docs/data.md)"
    )
    parser.add_argument("--av-tolerance", type=float, default=0.5, help="seconds, as data.av_tolerance")
    parser.add_argument("--batch-size", type=int, default=8, help="clips of one bucket encoded together")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--prompts", action="store_true", help="INPUT is a prompts file: write prompt shards")
    parser.add_argument("--per-shard", type=int, default=1000, help="--prompts: samples per shard")
    args = parser.parse_args(argv)

    rank, world = rank_and_world()
    if args.device is None:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if args.prompts:
        encode_prompts(args, rank)
        return
    pattern = str(Path(args.input) / "*.tar") if Path(args.input).is_dir() else args.input
    urls = expand_urls(pattern)
    buckets = [parse_bucket(b) for b in args.bucket or ["256x448:5", "256x448:2"]]
    mine = [(n, url) for n, url in enumerate(urls) if n % world == rank]
    todo = [(n, url) for n, url in mine if not shard_path(args.out_dir, n).exists()]
    print(f"rank {rank}/{world}: {len(mine)} shards, {len(mine) - len(todo)} already encoded")
    negative = rank == 0 and not (args.out_dir / NEGATIVE_FILE).exists()
    if not todo and not negative:
        return
    sr = tuple(int(v) for v in args.sr.lower().split("x")) if args.sr else None
    job = Job(
        load_codecs(args.overrides, args.device),
        RawOptions(
            policy=AVPolicy(
                args.av_mismatch, args.av_tolerance, "mask" if args.missing_audio == "keep" else "drop"
            )
        ),
        sr,
        DTYPES[args.dtype],
        args.device,
        args.batch_size,
    )
    problems: Counter = Counter()
    for number, url in todo:
        encode_shard(url, number, args.out_dir, buckets, job, problems)
    if negative:  # DMD-2's unconditional prompt for runs without codecs (data/prompts.py)
        write_negative(args.out_dir, job.codecs.text)
    print(f"rank {rank}: done; skipped samples: {dict(problems) or 'none'}")


if __name__ == "__main__":
    from magitrain.cli import command_line

    with command_line():
        main()
