"""Prompt shards: latent shards without video or audio, for data-free DMD-2 (docs/data.md, docs/training.md).

A prompt sample is `KEY.latents.safetensors` holding only `text_emb` [L, C] (the caption's real
tokens), with the geometry of the clip to generate, the video latent's `latent_shape` [T, H, W],
in the safetensors metadata, + `KEY.json` (caption, language, frames, height, width, bucket).
Its index row is a latent row with `prompt_only: true`, so the loader plans it into the bucket of
that geometry like any latent sample. A batch of prompt samples holds `text_emb`, `text_len`,
`latent_shape` [B, 3] and the list fields, and no `video_latent` / `audio_latent`.

Written by `data_tools/encode_shards.py --prompts PROMPTS.txt OUT_DIR codecs=...` with the real
text encoder of the codecs.

Beside the shards (prompt or latent), the encoder also writes `negative.safetensors`: the codecs'
negative prompt, `text_emb` [L, C], encoded once. DMD-2's guided teacher reads it as its
unconditional prompt when the run has no codecs (docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_safetensors

from magitrain.data.buckets import AUDIO_CHANNELS, VAE_TIME_STRIDE, VIDEO_CHANNELS, Bucket
from magitrain.data.index import GEOMETRY_KEY, latent_row
from magitrain.data.writer import write_shard
from magitrain.errors import UserError

ENCODE_BATCH = 32  # prompts encoded together (their embeddings are padded to the longest)
NEGATIVE_FILE = "negative.safetensors"  # the negative prompt's text embedding, beside the shards


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with `#` are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as exn:
        raise UserError(f"prompts file {path} is not UTF-8 text (byte {exn.start})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def prompt_sample(key: str, caption: str, text_emb: torch.Tensor, bucket: Bucket) -> tuple[dict, dict]:
    """(members, index row) of one prompt sample, for `write_shard`."""
    shape = bucket.latent_shape
    payload = save_safetensors(
        {"text_emb": text_emb.contiguous()}, metadata={GEOMETRY_KEY: ",".join(map(str, shape))}
    )
    meta = {
        "caption": caption,
        "frames": bucket.frames,
        "height": bucket.height,
        "width": bucket.width,
        "bucket": bucket.name,
    }
    members = {
        "__key__": key,
        "latents.safetensors": payload,
        "json": json.dumps(meta, ensure_ascii=False).encode(),
    }
    return members, {**latent_row(payload), "language": "", "has_audio": True}


def latent_geometry(batch: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(video [48, T, H, W], audio [N, 64]) per-sample shapes of a latent or a prompt batch."""
    if "video_latent" in batch:
        return tuple(batch["video_latent"].shape[1:]), tuple(batch["audio_latent"].shape[1:])
    if "latent_shape" not in batch:
        raise UserError("the batch holds neither video_latent nor latent_shape (a prompt batch's geometry)")
    t, h, w = (int(v) for v in batch["latent_shape"][0])
    return (VIDEO_CHANNELS, t, h, w), (VAE_TIME_STRIDE * (t - 1) + 1, AUDIO_CHANNELS)


def write_prompt_shards(
    prompts: list[str], out_dir: str | Path, text_encoder, buckets: list[Bucket], per_shard: int = 1000
) -> list[Path]:
    """Encode `prompts` (batches of the encoder's batch size) and write them as prompt shards of
    `per_shard` samples; prompt i gets bucket i mod len(buckets). Keys are the prompt's line order."""
    if not buckets:
        raise UserError("write_prompt_shards: no bucket given (--bucket HxW:SECONDS)")
    paths = []
    for number, start in enumerate(range(0, len(prompts), per_shard)):
        chunk = prompts[start : start + per_shard]

        def samples(chunk=chunk, start=start):
            for first in range(0, len(chunk), ENCODE_BATCH):
                emb, lengths = text_encoder.encode(chunk[first : first + ENCODE_BATCH])
                for i in range(emb.shape[0]):
                    index = start + first + i
                    text = emb[i, : int(lengths[i])].cpu()
                    yield prompt_sample(f"{index:09d}", prompts[index], text, buckets[index % len(buckets)])

        paths.append(write_shard(out_dir, number, "latent", samples()))
    write_negative(out_dir, text_encoder)
    return paths


def save_negative(out_dir: str | Path, text_emb: torch.Tensor) -> Path:
    """Write the negative prompt's embedding [L, C] (its real tokens) as `OUT_DIR/negative.safetensors`."""
    path = Path(out_dir) / NEGATIVE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"text_emb": text_emb.detach().cpu().contiguous()}, str(path))
    return path


def write_negative(out_dir: str | Path, text_encoder) -> Path:
    """Encode the text encoder's negative prompt once and save it beside the shards."""
    emb, lengths = text_encoder.encode_negative(1)
    return save_negative(out_dir, emb[0, : int(lengths[0])])


def read_negative(path: str | Path, text_dim: int) -> torch.Tensor:
    """The negative prompt's embedding [L, text_dim] from a `negative.safetensors`."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"negative prompt embedding {path} does not exist") from None
    except (SafetensorError, OSError) as exn:
        raise UserError(
            f"negative prompt embedding {path} is not a readable safetensors file ({exn})"
        ) from None
    emb = tensors.get("text_emb")
    if emb is None or emb.ndim != 2 or emb.shape[1] != text_dim:
        got = "no text_emb" if emb is None else f"text_emb of shape {list(emb.shape)}"
        raise UserError(f"negative prompt embedding {path}: expected text_emb [L, {text_dim}], got {got}")
    return emb


def negative_beside(urls: list[str]) -> Path | None:
    """The `negative.safetensors` in the folder of local shards `urls` (the first folder holding one)."""
    for folder in dict.fromkeys(Path(u).parent for u in urls if "://" not in u and not u.startswith("pipe:")):
        if (folder / NEGATIVE_FILE).is_file():
            return folder / NEGATIVE_FILE
    return None
