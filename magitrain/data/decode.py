"""Turn one shard sample (a dict of member bytes) into tensors cut to its bucket.

Raw: the clip is cut from the span both tracks cover (span.py). decord decodes the mp4 at 25 fps
(the frame nearest in presentation time, so variable-frame-rate clips stay in sync), frames are
resized to cover the bucket and centre-cropped, the clip is cut to the bucket's F = 4k+1 frames
and the audio to the F/25 s they cover, placed by its timestamps and resampled by PyAV (FFmpeg)
to `sample_rate`, mono, then copied to `channels`; an optional KEY.jpg reference image is
cover-cropped to the bucket too.
Latent: the safetensors payload is checked against the data contract and the bucket, then cut to
the bucket's T (and N = 4(T-1)+1 audio steps).

Any problem with the input raises `BadSample(reason)`; the dataset counts and skips it.
"""

import io
import json
import math
import random
from dataclasses import dataclass

import decord
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from magitrain.codecs.media import nearest_frames, read_audio, reference_image, resize_cover_crop
from magitrain.data.buckets import AUDIO_CHANNELS, FPS, VAE_TIME_STRIDE, VIDEO_CHANNELS, Bucket
from magitrain.data.index import AUDIO_EXTS, is_prompt_payload
from magitrain.data.span import AVPolicy, Unplanned, clip_span
from magitrain.data.voice import VoiceReference


class BadSample(Exception):
    """An unusable sample; `reason` is the counter it is filed under (e.g. corrupt_video)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def first_line(exn: Exception) -> str:
    """FFmpeg/decord errors carry pages of backtrace: keep the line that says what happened."""
    text = str(exn).strip()
    return f"{type(exn).__name__}: {text.splitlines()[0][:200] if text else ''}"


@dataclass(frozen=True)
class RawOptions:
    sample_rate: int = 51200  # the audio VAE's rate: 2048 samples per 25 Hz latent step
    channels: int = 2
    policy: AVPolicy = AVPolicy()  # noqa: RUF009 (frozen): av_mismatch, av_tolerance, missing_audio (span.py)
    random_offset: bool = False  # cut the bucket span at a seeded random start instead of 0
    decode_threads: int = 1  # per worker: the DataLoader workers are the parallelism
    max_pixels: int = 7680 * 4320  # larger videos and images are bad samples (too_large), not decoded


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
    of the bytes through worker IPC and host-to-device copies), audio float [channels, F/25 s],
    audio_mask (False: the clip has no audio and its audio loss is masked), cut from the span
    that span.clip_span keeps, exactly as planned."""
    meta = read_meta(sample)
    if "mp4" not in sample:
        raise BadSample("missing_video", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        span = clip_span(row, opts.policy)
    except Unplanned as exn:
        raise BadSample(exn.reason, str(exn)) from None
    if span.frames < bucket.frames:
        raise BadSample("too_short", f"the usable span has {span.frames} frames at 25 fps < {bucket.frames}")
    if row["width"] * row["height"] > opts.max_pixels:  # the mp4's header, as the index recorded it
        raise BadSample(
            "too_large", f"the video is {row['width']}x{row['height']} > data.max_pixels={opts.max_pixels}"
        )
    first = span.first + (rng.randrange(span.frames - bucket.frames + 1) if opts.random_offset else 0)
    frames = decode_frames(sample["mp4"], row, bucket, first, opts.decode_threads)
    video = cover_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), bucket).permute(1, 0, 2, 3).contiguous()
    length = bucket.audio_samples(opts.sample_rate)
    note = None
    if span.has_audio:
        audio, padded = decode_audio(sample, row, first / FPS, length, opts.sample_rate)
        note = "audio_padded" if padded else None
    else:
        audio = torch.zeros(1, length)
        note = "audio_masked" if opts.policy.missing_audio == "mask" else "audio_silenced"
    out = {
        "video": video,
        "audio": audio.expand(opts.channels, -1).contiguous(),
        "audio_mask": span.has_audio or opts.policy.missing_audio == "silence",
        "caption": meta["caption"],
        "language": str(meta.get("language", "")),
        "key": sample["__key__"],
        "note": note,
    }
    if "jpg" in sample:
        out["ref_image"] = decode_image(sample["jpg"], bucket, opts.max_pixels)
    return out


def decode_image(data: bytes, bucket: Bucket, max_pixels: int) -> torch.Tensor:
    """KEY.jpg (the image-to-video reference) -> [3, H, W] uint8 at the bucket's size, prepared as
    inference prepares `image=` (`reference_image`: EXIF orientation, aspect crop, Lanczos).

    The size is read from the header first: a small file can declare a huge image (a 2 MB solid
    12000x12000 JPEG decodes to 432 MB and costs 2 GB on the way to the bucket), so one above
    `max_pixels` is refused (too_large) before anything is decoded. A JPEG is decoded at the
    smallest DCT scale that still covers the bucket in either orientation (PIL's draft; the EXIF
    tag may turn it), not at full size."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise BadSample(
                "too_large", f"KEY.jpg is {image.width}x{image.height} > data.max_pixels={max_pixels}"
            )
        scale = max(bucket.width, bucket.height) / min(image.width, image.height)
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        pixels = reference_image(image, (bucket.height, bucket.width))
    except BadSample:
        raise
    except Exception as exn:
        raise BadSample("corrupt_image", first_line(exn)) from None
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def cover_crop(frames: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """[F, 3, h, w] uint8 -> [F, 3, H, W]. Frames the decoder already scaled to cover the bucket only
    need the centre crop (a view: resize_cover_crop would round-trip them through float)."""
    h, w = frames.shape[-2:]
    if h >= bucket.height and w >= bucket.width and (h == bucket.height or w == bucket.width):
        top, left = (h - bucket.height) // 2, (w - bucket.width) // 2
        return frames[..., top : top + bucket.height, left : left + bucket.width]
    return resize_cover_crop(frames, (bucket.height, bucket.width))


# Output sizes at which decord's scaled decode failed: FFmpeg's scaler hands decord rgb24 rows
# padded past width x 3 bytes for some widths (16, 24, 48, 72 px among others: a 48 px row comes
# back 192 bytes long, not 144), and decord's copy into its array refuses the size ("from_size ==
# to_size (16512 vs. 12384)"). Those sizes decode at native size and are resized here instead.
_SCALER_FAILS: set[tuple[int, int]] = set()


def decoder_size(row: dict, bucket: Bucket) -> tuple[int, int] | None:
    """(height, width) for FFmpeg to scale to while decoding: exactly the bucket along one axis and
    covering it along the other, so that only a centre crop is left; None to decode at native
    size (never upscale in the decoder: resize_cover_crop interpolates small sources).
    Scaling while decoding is ~10x cheaper than decoding a 720p source and resizing tensors."""
    scale = max(bucket.height / row["height"], bucket.width / row["width"])
    if scale >= 1:
        return None
    # FFmpeg rounds odd sizes; an even cover size keeps its rgb24 scaler exact
    width = max(bucket.width, 2 * math.ceil(row["width"] * scale / 2 - 1e-6))
    height = max(bucket.height, 2 * math.ceil(row["height"] * scale / 2 - 1e-6))
    return height, width


def decode_frames(data: bytes, row: dict, bucket: Bucket, first: int, threads: int) -> np.ndarray:
    """[F, h, w, 3] uint8: the bucket's F frames at 25 fps from frame `first` (the source frame
    nearest in presentation time), scaled by the decoder when it can (decoder_size), else at
    native size."""
    size = decoder_size(row, bucket)
    if size is not None and size not in _SCALER_FAILS:
        try:
            return _read_frames(data, bucket, first, threads, size)
        except BadSample:
            raise
        except Exception as exn:  # the scaled decode failed: a good clip must not turn "corrupt"
            if "from_size" in str(exn):
                _SCALER_FAILS.add(size)
    try:
        return _read_frames(data, bucket, first, threads, None)
    except BadSample:
        raise
    except Exception as exn:  # decord raises DECORDError/RuntimeError on any damage
        raise BadSample("corrupt_video", first_line(exn)) from None


def _read_frames(data: bytes, bucket: Bucket, first: int, threads: int, size) -> np.ndarray:
    scaled = {} if size is None else {"height": size[0], "width": size[1]}
    reader = decord.VideoReader(io.BytesIO(data), num_threads=threads, **scaled)
    # [start, end) presentation times; the first frame's start is the clip's time 0, as for the audio
    shown = reader.get_frame_timestamp(range(len(reader)))
    times = (first + np.arange(bucket.frames)) / FPS
    if times[-1] >= shown[-1, 1] - shown[0, 0]:
        raise BadSample(
            "too_short",
            f"the video ends at {shown[-1, 1] - shown[0, 0]:.3f} s, before frame {first} + {bucket.frames} "
            f"at 25 fps that the plan cuts",
        )
    return reader.get_batch(nearest_frames(shown[:, 0] - shown[0, 0], times).tolist()).asnumpy()


def decode_audio(sample: dict, row: dict, start: float, length: int, rate: int) -> tuple[torch.Tensor, bool]:
    """(mono [1, length] at `rate` for the time [start, start + length/rate) s after the first video
    frame, whether more than one latent step of it is silence padding where the track has no audio).
    A separate audio member wins over the mp4's track; padding beyond what the index's audio
    extent explains means the track is shorter than the index says: too_short."""
    source = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    in_video = source is None
    try:
        wave, covered = read_audio(sample["mp4"] if in_video else source, in_video, start, length, rate)
    except Exception as exn:
        raise BadSample("corrupt_audio", first_line(exn)) from None
    a_start = float(row.get("audio_start", 0.0))
    a_end = a_start + float(row.get("audio_duration", float("inf")))
    promised = max(0.0, min(a_end, start + length / rate) - max(a_start, start)) * rate
    step = rate // FPS  # one latent step: resampler edges and encoder frame padding stay below it
    if covered < promised - step:
        raise BadSample(
            "too_short", f"audio covers {covered} samples of the {round(promised)} the index promised"
        )
    return wave, length - covered > step


LATENT_KEYS = ("video_latent", "audio_latent", "text_emb")
DEFAULT_POLICY = AVPolicy()


def decode_latent(
    sample: dict,
    bucket: Bucket,
    text_max_len: int,
    text_dim: int | None = None,
    policy: AVPolicy = DEFAULT_POLICY,
    voice: VoiceReference | None = None,
    rng: random.Random | None = None,
    speaker_audio: torch.Tensor | None = None,
) -> dict:
    """Latent sample cut to the bucket: video [48, T, H, W], audio [4(T-1)+1, 64], text [L, C],
    audio_mask from the sample's `has_audio` under `policy.missing_audio`; with `voice` on
    (`data.voice_reference`) `ref_audio_latent` [R, 64] from `rng`'s draws: a span of the clip's
    audio outside the cut (same_clip) or of `speaker_audio`, the audio latents of another clip of the
    speaker (same_speaker; None: it has none); R = 0: no reference.

    Shapes are checked against the data contract, the bucket and `text_dim` (the dataset's text
    width) before anything is stacked (bad_shape), and every value must be finite (non_finite)."""
    meta = read_meta(sample)
    if "latents.safetensors" not in sample:
        raise BadSample("missing_latents", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        tensors = load_safetensors(sample["latents.safetensors"])
    except Exception as exn:
        raise BadSample("bad_latents", first_line(exn)) from None
    if "video_latent" not in tensors and "text_emb" in tensors:
        if is_prompt_payload(sample["latents.safetensors"]):
            return decode_prompt(tensors, sample, meta, bucket, text_max_len, text_dim)
    missing = [k for k in LATENT_KEYS if k not in tensors]
    if missing:
        raise BadSample("bad_latents", f"missing tensors {missing}")
    check_latent_shapes(tensors, bucket, text_dim)
    t = bucket.latent_shape[0]
    n = VAE_TIME_STRIDE * (t - 1) + 1
    has_audio = bool(meta.get("has_audio", True))
    if not has_audio and policy.missing_audio == "drop":
        raise BadSample("missing_audio", "the sample has no audio (has_audio false; data.missing_audio=drop)")
    out = {
        "video_latent": tensors["video_latent"][:, :t],
        "audio_latent": tensors["audio_latent"][:n],
        "text_emb": tensors["text_emb"][:text_max_len],
    }
    if "ref_latent" in tensors:
        out["ref_latent"] = tensors["ref_latent"]
    if "lr_video_latent" in tensors:
        out["lr_video_latent"] = tensors["lr_video_latent"][:, :t]
    if voice is not None and voice.enabled:
        audio = tensors["audio_latent"]
        source, target = (audio, (0, n)) if voice.source == "same_clip" else (speaker_audio, (0, 0))
        take = voice.wants(rng) and has_audio and source is not None
        out["ref_audio_latent"] = voice.cut(source, target, rng).to(audio.dtype) if take else audio[:0]
    for name, tensor in out.items():
        # a sum is finite iff every value is (short of an overflow only absurd latents reach);
        # 25x cheaper than isfinite() over a bf16 tensor, which counts only when something is wrong
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BadSample("non_finite", f"{name} {tuple(tensor.shape)} has {bad} non-finite values")
    check_text_rows(out["text_emb"])
    return out | {
        "audio_mask": has_audio or policy.missing_audio == "silence",
        "note": None
        if has_audio
        else ("audio_masked" if policy.missing_audio == "mask" else "audio_silenced"),
        "caption": meta["caption"],
        "language": str(meta.get("language", "")),
        "key": sample["__key__"],
    }


def check_text_rows(text: torch.Tensor) -> None:
    """Every stored text row is a real token's hidden state, never all zeros: a zero row is what a
    batched encoder that assumed right padding wrote for a left-padded prompt (an empty caption)."""
    zero = text.abs().sum(-1).eq(0)
    if zero.any():
        raise BadSample("zero_text", f"text_emb has {int(zero.sum())} of {len(zero)} rows all zero")


def decode_prompt(
    tensors: dict, sample: dict, meta: dict, bucket: Bucket, text_max_len: int, text_dim: int | None
) -> dict:
    """A prompt sample (data/prompts.py): its text and the bucket's geometry, `latent_shape` [3]."""
    text = tensors["text_emb"]
    if text.ndim != 2 or text.shape[0] < 1 or (text_dim is not None and text.shape[1] != text_dim):
        raise BadSample("bad_shape", f"text_emb {tuple(text.shape)}, needs [L >= 1, {text_dim or 'C'}]")
    text = text[:text_max_len]
    if text.is_floating_point() and not torch.isfinite(text.sum()):
        raise BadSample("non_finite", f"text_emb {tuple(text.shape)} has non-finite values")
    check_text_rows(text)
    return {
        "text_emb": text,
        "latent_shape": torch.tensor(bucket.latent_shape, dtype=torch.long),
        "audio_mask": True,
        "note": None,
        "caption": meta["caption"],
        "language": str(meta.get("language", "")),
        "key": sample["__key__"],
    }


def check_latent_shapes(tensors: dict, bucket: Bucket, text_dim: int | None) -> None:
    """The data contract (docs/data.md): video [48, T, H, W] with the bucket's H, W and T at least
    its T; audio [4(T-1)+1, 64] for the stored T; text [L, text_dim]; SR pairs' lr video
    [48, T, h, w]; ref [48, 1, H, W] (or h, w for SR pairs). A mismatch is a bad_shape sample
    naming the shapes."""
    t, h, w = bucket.latent_shape
    video, audio, text = (tensors[k] for k in LATENT_KEYS)
    problems = []
    if (
        video.ndim != 4
        or video.shape[0] != VIDEO_CHANNELS
        or tuple(video.shape[2:]) != (h, w)
        or video.shape[1] < t
    ):
        problems.append(
            f"video_latent {tuple(video.shape)}, bucket {bucket.name} needs [48, >={t}, {h}, {w}]"
        )
    stored_t = video.shape[1] if video.ndim == 4 else t
    n = VAE_TIME_STRIDE * (stored_t - 1) + 1
    if audio.ndim != 2 or tuple(audio.shape) != (n, AUDIO_CHANNELS):
        problems.append(f"audio_latent {tuple(audio.shape)}, needs [{n}, 64] (N = 4(T-1)+1)")
    if text.ndim != 2 or text.shape[0] < 1 or (text_dim is not None and text.shape[1] != text_dim):
        problems.append(f"text_emb {tuple(text.shape)}, needs [L >= 1, {text_dim or 'C'}]")
    low = tensors.get("lr_video_latent")
    if low is not None and (low.ndim != 4 or low.shape[0] != VIDEO_CHANNELS or low.shape[1] < t):
        problems.append(f"lr_video_latent {tuple(low.shape)}, needs [48, >={t}, h, w]")
    ref = tensors.get("ref_latent")
    sizes = {(h, w)} | ({tuple(low.shape[2:])} if low is not None else set())  # SR pairs: the base size
    if ref is not None and (
        ref.ndim != 4 or ref.shape[:2] != (VIDEO_CHANNELS, 1) or tuple(ref.shape[2:]) not in sizes
    ):
        problems.append(f"ref_latent {tuple(ref.shape)}, needs [48, 1, H, W] of the video or lr video")
    if problems:
        raise BadSample("bad_shape", "; ".join(problems))
