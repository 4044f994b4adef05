"""Turn one shard sample (a dict of member bytes) into tensors cut to its bucket.

Raw: decord decodes the mp4 at 25 fps (nearest frame), frames are resized to cover the bucket and
centre-cropped, the clip is cut to the bucket's 4k+1 frames and the audio to the matching span,
resampled by decord (FFmpeg) to `sample_rate`, mono, then copied to `channels`; an optional
KEY.jpg reference image is cover-cropped to the bucket too.
Latent: the safetensors payload is cut to the bucket's T (and N = 4(T-1)+1 audio steps).

Any problem with the input raises `BadSample(reason)`; the dataset counts and skips it.
"""

import io
import json
import math
import random
from dataclasses import dataclass

import av
import decord
import torch
from safetensors.torch import load as load_safetensors

from magitrain.codecs.media import frame_indices, resize_cover_crop
from magitrain.data.buckets import FPS, VAE_TIME_STRIDE, Bucket
from magitrain.data.index import AUDIO_EXTS


class BadSample(Exception):
    """An unusable sample; `reason` is the counter it is filed under (e.g. corrupt_video)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def first_line(exn: Exception) -> str:
    """FFmpeg/decord errors carry pages of backtrace: keep the line that says what happened."""
    text = str(exn).strip()
    return f"{type(exn).__name__}: {text.splitlines()[0][:200] if text else ''}"


@dataclass(frozen=True)
class RawOptions:
    sample_rate: int = 51200  # the audio VAE's rate: 2048 samples per 25 Hz latent step
    channels: int = 2
    missing_audio: str = "silent"  # "silent": a zero track; "skip": drop the sample
    random_offset: bool = False  # cut the bucket span at a seeded random start instead of 0
    decode_threads: int = 1  # per worker: the DataLoader workers are the parallelism


def read_meta(sample: dict) -> dict:
    """KEY.json as a dict, with the caption also accepted from KEY.txt (video2dataset's layout)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError) as exn:
        raise BadSample("bad_json", str(exn)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    if "caption" not in meta and "txt" in sample:
        meta["caption"] = sample["txt"].decode("utf-8", "replace").strip()
    if not isinstance(meta.get("caption"), str):
        raise BadSample("missing_caption", "no caption in KEY.json or KEY.txt")
    return meta


def decode_raw(sample: dict, row: dict, bucket: Bucket, opts: RawOptions, rng: random.Random) -> dict:
    """video uint8 [3, F, H, W] (converted to [-1, 1] on the device by encode_raw_batch: a quarter
    of the bytes through worker IPC and host-to-device copies), audio float [channels, S]."""
    meta = read_meta(sample)
    if "mp4" not in sample:
        raise BadSample("missing_video", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        reader = open_video(sample["mp4"], row, bucket, opts.decode_threads)
        indices = frame_indices(len(reader), reader.get_avg_fps(), FPS)
    except Exception as exn:  # decord raises DECORDError/RuntimeError on any damage
        raise BadSample("corrupt_video", first_line(exn)) from None
    if len(indices) < bucket.frames:
        raise BadSample("too_short", f"{len(indices)} frames at 25 fps < {bucket.frames}")
    start = rng.randrange(len(indices) - bucket.frames + 1) if opts.random_offset else 0
    try:
        frames = reader.get_batch(indices[start : start + bucket.frames]).asnumpy()
    except Exception as exn:
        raise BadSample("corrupt_video", first_line(exn)) from None
    video = cover_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), bucket).permute(1, 0, 2, 3).contiguous()
    audio = decode_audio(sample, row, bucket, opts, start / FPS)
    out = {
        "video": video,
        "caption": meta["caption"],
        "language": str(meta.get("language", "")),
        "key": sample["__key__"],
        "audio_silenced": audio is None,
        "audio": torch.zeros(opts.channels, bucket.audio_samples(opts.sample_rate))
        if audio is None
        else audio,
    }
    if "jpg" in sample:
        out["ref_image"] = decode_image(sample["jpg"], bucket)
    return out


def decode_image(data: bytes, bucket: Bucket) -> torch.Tensor:
    """KEY.jpg (the image-to-video reference) -> [3, H, W] uint8, cover-resized to the bucket."""
    try:
        with av.open(io.BytesIO(data)) as container:
            image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    except Exception as exn:
        raise BadSample("corrupt_image", first_line(exn)) from None
    return resize_cover_crop(torch.from_numpy(image).permute(2, 0, 1)[None], (bucket.height, bucket.width))[0]


def cover_crop(frames: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """[F, 3, h, w] uint8 -> [F, 3, H, W]. Frames the decoder already scaled to cover the bucket only
    need the centre crop (a view: resize_cover_crop would round-trip them through float)."""
    h, w = frames.shape[-2:]
    if h >= bucket.height and w >= bucket.width and (h == bucket.height or w == bucket.width):
        top, left = (h - bucket.height) // 2, (w - bucket.width) // 2
        return frames[..., top : top + bucket.height, left : left + bucket.width]
    return resize_cover_crop(frames, (bucket.height, bucket.width))


def open_video(data: bytes, row: dict, bucket: Bucket, threads: int) -> decord.VideoReader:
    """A reader whose frames FFmpeg already scaled to exactly the crop size along one axis and to
    cover the bucket along the other, so only a centre crop is left (resize_cover_crop then does
    no interpolation). Scaling while decoding is ~10x cheaper than decoding a 720p source at full
    size and resizing the tensors."""
    scale = max(bucket.height / row["height"], bucket.width / row["width"])
    if scale >= 1:  # never upscale in the decoder: resize_cover_crop interpolates small sources
        return decord.VideoReader(io.BytesIO(data), num_threads=threads)
    # FFmpeg rounds odd sizes; an even cover size keeps its rgb24 scaler exact
    width = max(bucket.width, 2 * math.ceil(row["width"] * scale / 2 - 1e-6))
    height = max(bucket.height, 2 * math.ceil(row["height"] * scale / 2 - 1e-6))
    return decord.VideoReader(io.BytesIO(data), num_threads=threads, width=width, height=height)


def decode_audio(
    sample: dict, row: dict, bucket: Bucket, opts: RawOptions, start_s: float
) -> torch.Tensor | None:
    """`[channels, S]` for the bucket span; a separate audio member wins over the mp4's track.
    None if the sample has no audio and data.missing_audio=silent (the caller adds the zero track)."""
    length = bucket.audio_samples(opts.sample_rate)
    source = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    if source is None and row.get("has_audio", True):
        source = sample["mp4"]
    if source is None:
        if opts.missing_audio == "skip":
            raise BadSample("missing_audio", "no audio track or audio member (data.missing_audio=skip)")
        return None
    try:
        reader = decord.AudioReader(io.BytesIO(source), sample_rate=opts.sample_rate, mono=True)
        offset = round(start_s * opts.sample_rate)
        wave = torch.from_numpy(reader[offset : offset + length].asnumpy()).float()
    except Exception as exn:
        raise BadSample("corrupt_audio", first_line(exn)) from None
    if wave.shape[-1] < length - opts.sample_rate // FPS:
        raise BadSample("too_short", f"audio has {wave.shape[-1]} samples, the bucket needs {length}")
    # encoders' frame padding can leave the track a few ms short of the video: pad with silence
    wave = torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))
    return wave[:1].expand(opts.channels, -1).contiguous()


LATENT_KEYS = ("video_latent", "audio_latent", "text_emb")


def decode_latent(sample: dict, bucket: Bucket, text_max_len: int) -> dict:
    """Latent sample cut to the bucket: video [48, T, H, W], audio [4(T-1)+1, 64], text [L, C]."""
    meta = read_meta(sample)
    if "latents.safetensors" not in sample:
        raise BadSample("missing_latents", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        tensors = load_safetensors(sample["latents.safetensors"])
    except Exception as exn:
        raise BadSample("bad_latents", first_line(exn)) from None
    missing = [k for k in LATENT_KEYS if k not in tensors]
    if missing:
        raise BadSample("bad_latents", f"missing tensors {missing}")
    t = bucket.latent_shape[0]
    n = VAE_TIME_STRIDE * (t - 1) + 1
    video, audio = tensors["video_latent"], tensors["audio_latent"]
    if video.ndim != 4 or video.shape[1] < t or audio.ndim != 2 or audio.shape[0] < n:
        raise BadSample(
            "bad_latents",
            f"video {tuple(video.shape)} / audio {tuple(audio.shape)} "
            f"do not cover bucket {bucket.name} (T={t}, N={n})",
        )
    out = {
        "video_latent": video[:, :t],
        "audio_latent": audio[:n],
        "text_emb": tensors["text_emb"][:text_max_len],
        "caption": meta["caption"],
        "language": str(meta.get("language", "")),
        "key": sample["__key__"],
    }
    if "ref_latent" in tensors:
        out["ref_latent"] = tensors["ref_latent"]
    if "lr_video_latent" in tensors:
        out["lr_video_latent"] = tensors["lr_video_latent"][:, :t]
    return out
