"""The sidecar index of a shard: what the loader and tools plan with, without opening the tar.

`NAME.tar` has `NAME.index.json` beside it (format in docs/data.md):

    {"format": "magitrain.shard-index", "version": 2, "kind": "raw" | "latent",
     "num_samples": 2, "bytes": 81920,
     "samples": [{"key": "00000000000", "bytes": 40960, "offset": 0, "duration": 2.0, "width": 128,
                  "height": 64, "fps": 25.0, "has_audio": true, "audio_start": 0.0,
                  "audio_duration": 1.93, "language": "en"}, ...]}

Latent rows hold `latent_shape` [T, H, W], `audio_len`, `text_len`, `text_dim` and `has_audio`
instead of the media fields; SR pairs add `lr_latent_shape` [T, h, w] of their `lr_video_latent`;
prompt samples (data/prompts.py) add `prompt_only: true` (their latent_shape is the one to generate).
The rows are in tar order; `offset` (optional: indexes written before it have none) is the byte
position of the sample's first tar header, where a loader slot that starts mid-shard seeks to.
"""

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av

from magitrain.data.buckets import VAE_TIME_STRIDE
from magitrain.data.shards import is_local, iter_tar, open_url, sample_offsets

log = logging.getLogger(__name__)

FORMAT = "magitrain.shard-index"
VERSION = 2  # 2 added the audio extent of raw rows and text_dim of latent rows; 1 still reads
AUDIO_EXTS = ("wav", "flac", "m4a")
GEOMETRY_KEY = "latent_shape"  # safetensors metadata of a prompt sample (data/prompts.py): "T,H,W"


@dataclass(frozen=True)
class ShardIndex:
    url: str
    kind: str
    rows: tuple[dict, ...]

    @property
    def num_samples(self) -> int:
        return len(self.rows)


def _seconds(value, time_base) -> float | None:
    return None if value is None else float(value * time_base)


def probe_media(source: str | bytes) -> dict:
    """Duration, size, frame rate and audio track of an mp4 (path or bytes), via PyAV.

    The audio track's `audio_start` is given in seconds after the first video frame (an AAC track
    that starts late, e.g. after an edit, has a positive one) and `audio_duration` in seconds.
    Raises av.error.FFmpegError / ValueError on an unreadable file; callers count and skip it.
    """
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = _seconds(stream.duration, stream.time_base)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        if duration is None:
            raise ValueError("unknown duration")
        if fps <= 0 or duration <= 0:
            raise ValueError(f"bad stream: fps={fps}, duration={duration}")
        row = {
            "duration": round(duration, 4),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": round(fps, 4),
            "has_audio": bool(container.streams.audio),
        }
        if container.streams.audio:
            video_start = _seconds(stream.start_time, stream.time_base) or 0.0
            row.update(_audio_extent(container, container.streams.audio[0], video_start))
        return row


def probe_audio(source: str | bytes) -> dict:
    """`audio_start` and `audio_duration` of a separate audio file (its time 0 is the video's first frame)."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        return _audio_extent(container, container.streams.audio[0], 0.0)


def _audio_extent(container, stream, video_start: float) -> dict:
    start = _seconds(stream.start_time, stream.time_base) or 0.0
    duration = _seconds(stream.duration, stream.time_base)
    if duration is None and container.duration is not None:
        duration = container.duration / av.time_base - start
    if duration is None or duration <= 0:
        raise ValueError(f"audio track of unknown or empty duration ({duration})")
    return {"audio_start": round(start - video_start, 4), "audio_duration": round(duration, 4)}


def write_index(path: str, kind: str, rows: list[dict], shard_bytes: int) -> None:
    """Write atomically (tmp + rename) so a crash never leaves a half index that looks finished."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "num_samples": len(rows),
        "bytes": shard_bytes,
        "samples": rows,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_index(url: str, index: str) -> ShardIndex:
    """Parse an index file; a malformed one is a clear error naming it (it is the plan's ground truth)."""
    with open_url(index) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        raise ValueError(
            f"{index}: not a {FORMAT} v{VERSION} file (format={doc.get('format')!r}, "
            f"version={doc.get('version')!r})"
        )
    rows = doc["samples"]
    if len(rows) != doc["num_samples"]:
        raise ValueError(f"{index}: num_samples={doc['num_samples']} but {len(rows)} rows")
    return ShardIndex(url, doc["kind"], tuple(rows))


def sample_row(sample: dict) -> dict:
    """Index row of one sample read from a tar (the slow path when a shard has no index)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    row = {
        "key": sample["__key__"],
        "bytes": sum(len(v) for k, v in sample.items() if not k.startswith("__")),
        "language": str(meta.get("language", "")),
    }
    if "speaker" in meta:  # the voice of data.voice_reference's source=same_speaker
        row["speaker"] = str(meta["speaker"])
    if "latents.safetensors" in sample:
        row.update(latent_row(sample["latents.safetensors"]))
        row.update({k: meta[k] for k in ("duration", "width", "height", "fps", "has_audio") if k in meta})
        return row
    row.update(probe_media(sample["mp4"]))
    audio = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    if audio is not None:  # a separate audio member wins over the mp4's track
        row.update(probe_audio(audio), has_audio=True)
    return row


def latent_row(data: bytes) -> dict:
    """Shapes of a latent sample, read from the safetensors header only (no tensor is loaded)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    if "video_latent" not in header:  # a prompt sample (data-free DMD-2): text + target geometry
        return prompt_row(header)
    shape = header["video_latent"]["shape"]
    row = {
        "latent_shape": shape[1:],
        "audio_len": header["audio_latent"]["shape"][0],
        "text_len": header["text_emb"]["shape"][0],
        "text_dim": header["text_emb"]["shape"][-1],
    }
    if "lr_video_latent" in header:  # an SR pair (encode_shards.py --sr)
        row["lr_latent_shape"] = header["lr_video_latent"]["shape"][1:]
    return row


def prompt_row(header: dict) -> dict:
    """The index row of a prompt sample from its safetensors header (`latent_row`'s prompt case)."""
    geometry = header.get("__metadata__", {}).get(GEOMETRY_KEY)
    if geometry is None:
        raise ValueError(
            f"a latent sample without video_latent must be a prompt sample with {GEOMETRY_KEY!r} "
            "in its safetensors metadata (data_tools/encode_shards.py --prompts writes them)"
        )
    t, h, w = (int(v) for v in geometry.split(","))
    return {
        "latent_shape": [t, h, w],
        "audio_len": VAE_TIME_STRIDE * (t - 1) + 1,
        "text_len": header["text_emb"]["shape"][0],
        "text_dim": header["text_emb"]["shape"][-1],
        "prompt_only": True,
    }


def is_prompt_payload(data: bytes) -> bool:
    """Whether a `KEY.latents.safetensors` payload is a prompt sample's (its header names the
    geometry): a latent sample that lost its video stays a bad sample, not a prompt."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return GEOMETRY_KEY in header.get("__metadata__", {}) and "video_latent" not in header


def scan_shard(url: str) -> Iterator[dict]:
    """Index rows of a shard by reading it; unreadable samples get `{"key", "error"}` rows."""
    for sample in iter_tar(url):
        if "__error__" in sample:
            yield {"key": None, "error": f"truncated_tar: {sample['__error__']}"}
            return
        try:
            yield sample_row(sample)
        except Exception as exn:  # a broken member of one sample must not hide the rest
            yield {"key": sample["__key__"], "error": f"{type(exn).__name__}: {exn}"}


def build_index(url: str) -> ShardIndex:
    """Index a shard that has none (warns: it reads the whole tar). Broken samples are left out,
    so the loader plans only what it can read; inspect_shards --validate lists them."""
    log.warning(
        "shard %s has no sidecar index: scanning the tar (write one with "
        "data_tools/inspect_shards.py --write-index)",
        url,
    )
    rows, kind = [], "raw"
    offsets = sample_offsets(url) if is_local(url) else {}
    for row in scan_shard(url):
        if "error" in row:
            log.warning("shard %s: sample %s left out of the index: %s", url, row["key"], row["error"])
            continue
        kind = "latent" if "latent_shape" in row else "raw"
        if row["key"] in offsets:
            row["offset"] = offsets[row["key"]]
        rows.append(row)
    return ShardIndex(url, kind, tuple(rows))
