"""Resolution x duration buckets: every batch is cut to one bucket, so every batch has one shape.

A bucket is (height, width, frames) in pixels at 25 fps with frames = 4k + 1, which is what the
video VAE needs (T = (F - 1)/4 + 1 latent frames) and what makes the audio latent length
N = 4(T - 1) + 1 = F line up one audio token per video frame. A bucket written in seconds is
rounded DOWN to the nearest 4k + 1 frames (2 s -> 49 frames, 5 s -> 125 frames).
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FPS = 25.0
VAE_TIME_STRIDE = 4
VIDEO_CHANNELS, AUDIO_CHANNELS = 48, 64  # of the video and audio latents
VAE_SPACE_STRIDE = 16


def frames_for_seconds(seconds: float) -> int:
    """Largest F = 4k + 1 with (F - 1)/25 <= seconds."""
    k = math.floor(seconds * FPS / VAE_TIME_STRIDE + 1e-6)
    if k < 1:
        raise ValueError(f"a bucket of {seconds} s is shorter than one latent step (0.16 s at 25 fps)")
    return VAE_TIME_STRIDE * k + 1


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}f"

    @property
    def seconds(self) -> float:
        """Span of the clip the bucket cuts: first to last frame."""
        return (self.frames - 1) / FPS

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the video latent."""
        return (
            (self.frames - 1) // VAE_TIME_STRIDE + 1,
            self.height // VAE_SPACE_STRIDE,
            self.width // VAE_SPACE_STRIDE,
        )

    def audio_samples(self, sample_rate: int) -> int:
        """Waveform length of the clip: the F/25 s its F frames cover, one 25 Hz audio latent step
        per frame (F x 2048 samples at 51.2 kHz), as at inference; no step encodes padding."""
        return round(self.frames / FPS * sample_rate)


def parse_buckets(spec: Iterable[Mapping]) -> list[Bucket]:
    """Buckets from config rows `{height, width, seconds | frames, batch_size}`; errors name the row."""
    buckets = []
    for i, row in enumerate(spec):
        row = dict(row)
        try:
            height, width, batch_size = int(row["height"]), int(row["width"]), int(row["batch_size"])
            frames = int(row["frames"]) if "frames" in row else frames_for_seconds(float(row["seconds"]))
        except KeyError as exn:
            raise ValueError(
                f"data.buckets[{i}] = {row}: missing field {exn}; need height, width, "
                "batch_size and seconds or frames"
            ) from None
        if height % VAE_SPACE_STRIDE or width % VAE_SPACE_STRIDE:
            raise ValueError(
                f"data.buckets[{i}]: height and width must be multiples of 16, got {height}x{width}"
            )
        if (frames - 1) % VAE_TIME_STRIDE or frames < 1:
            raise ValueError(f"data.buckets[{i}]: frames must be 4k+1, got {frames}")
        if batch_size < 1:
            raise ValueError(f"data.buckets[{i}]: batch_size must be >= 1, got {batch_size}")
        buckets.append(Bucket(height, width, frames, batch_size))
    if not buckets:
        raise ValueError("data.buckets is empty: configure at least one {height, width, seconds, batch_size}")
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise ValueError(f"data.buckets has duplicates: {names}")
    return buckets


def assign_raw(buckets: list[Bucket], width: int, height: int, frames: int) -> int:
    """Bucket index for a clip whose usable span (span.py) has `frames` frames at 25 fps, or -1 if
    it is shorter than every bucket of its resolution.

    Resolution: the bucket aspect ratio nearest the clip's (log scale, so 2:1 and 1:2 are equally
    far from 1:1); the clip is then resized to cover it and centre-cropped. Duration: the longest
    bucket the span fills, so a clip is cut, never padded.
    """
    if width <= 0 or height <= 0:
        return -1
    aspect = math.log(width / height)
    best = min(
        {(b.height, b.width) for b in buckets}, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - aspect), hw)
    )
    return _longest(buckets, lambda b: (b.height, b.width) == best, frames)


def assign_latent(buckets: list[Bucket], latent_shape: tuple[int, int, int]) -> int:
    """Bucket index for a precomputed latent [48, T, H, W]: same H, W; longest bucket T <= T."""
    t, h, w = latent_shape
    return _longest(buckets, lambda b: b.latent_shape[1:] == (h, w), (t - 1) * VAE_TIME_STRIDE + 1)


def _longest(buckets: list[Bucket], fits, available_frames: int) -> int:
    best = -1
    for i, b in enumerate(buckets):
        if fits(b) and b.frames <= available_frames and (best < 0 or b.frames > buckets[best].frames):
            best = i
    return best
