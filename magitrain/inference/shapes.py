"""Output sizes: resolution presets and the latent shapes of a clip (REFERENCE §1, §3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from magitrain.codecs.audio import num_latent_frames

log = logging.getLogger("magitrain")

FPS = 25
# name -> (width, height) in pixels. 1080p is 1088 high: the latent grid must be a whole number
# of 2x2 patches of 16-pixel latent cells, i.e. a multiple of 32 pixels.
RESOLUTIONS = {"256p": (448, 256), "540p": (896, 512), "1080p": (1920, 1088)}
PIXELS_PER_PATCH = 32


def parse_resolution(value: str) -> tuple[int, int]:
    """'256p' | '540p' | '1080p' | 'WIDTHxHEIGHT' -> (width, height). Sizes are floored to multiples of
    32 as the release floors them (1280x720 -> 1280x704), and the size used is logged."""
    if value in RESOLUTIONS:
        return RESOLUTIONS[value]
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"resolution {value!r} is neither a preset {sorted(RESOLUTIONS)} nor WIDTHxHEIGHT"
        ) from None
    floored = width // PIXELS_PER_PATCH * PIXELS_PER_PATCH, height // PIXELS_PER_PATCH * PIXELS_PER_PATCH
    if min(floored) <= 0:
        raise ValueError(f"resolution {value!r}: width and height must be at least 32 pixels")
    if floored != (width, height):
        log.info("resolution %s -> %dx%d (floored to multiples of 32, as released)", value, *floored)
    return floored


def parse_output_size(value: str) -> tuple[int, int]:
    """`output_size=WIDTHxHEIGHT` (pixels, any even sizes: the frames are resized after decoding)."""
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"output_size {value!r} is not WIDTHxHEIGHT") from None
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"output_size {value!r}: width and height must be positive and even (H.264 yuv420p)")
    return width, height


def oriented_like(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """`size` (width, height) turned to the orientation of `target` (width, height); a square
    target keeps it. The base stage of an SR clip, which the SR stage stretches to the SR grid, is
    portrait when the SR clip is (256x448 under 1088x1920): a landscape grid stretched onto a
    portrait clip would distort it. Inference sizes its base stage so, SR training its LR clip."""
    (width, height), (target_width, target_height) = size, target
    if (width - height) * (target_width - target_height) < 0:
        return height, width
    return width, height


@dataclass(frozen=True)
class ClipShape:
    """A clip of `seconds` at `width` x `height`: `seconds*25 + 1` frames and as many audio tokens."""

    width: int
    height: int
    frames: int

    @classmethod
    def of(cls, seconds: float, resolution: str) -> ClipShape:
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        width, height = parse_resolution(resolution)
        return cls(width, height, num_latent_frames(seconds))

    @classmethod
    def stages(cls, seconds: float, resolution: str, sr: str | None) -> tuple[ClipShape, ClipShape | None]:
        """The base-stage clip at `resolution` and the SR clip at `sr` (None without an SR stage);
        the base stage takes the SR clip's orientation (`oriented_like`)."""
        base = cls.of(seconds, resolution)
        if not sr:
            return base, None
        high = base.with_resolution(sr)
        return cls(*oriented_like((base.width, base.height), (high.width, high.height)), base.frames), high

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    @property
    def latent_size(self) -> tuple[int, int, int]:
        """(T, H, W) of the 48-channel video latent (VAE stride 4 x 16 x 16)."""
        return self.latent_frames, self.height // 16, self.width // 16

    @property
    def audio_tokens(self) -> int:
        return self.frames

    def video_latent_shape(self, batch: int = 1) -> tuple[int, ...]:
        return (batch, 48, *self.latent_size)

    def audio_latent_shape(self, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.audio_tokens, 64)

    def with_resolution(self, resolution: str) -> ClipShape:
        """The same clip length at another resolution (the SR stage's target)."""
        return ClipShape(*parse_resolution(resolution), self.frames)
