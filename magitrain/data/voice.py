"""Voice references for training (`data.voice_reference`): per sample, with probability `p`, clean
audio latents of the same speaker that do not overlap the target span, which the model sees at the
release's reference-audio slot (`magitrain.model.layout.REF_AUDIO_OFFSET`).

`source`: "same_clip" takes another span of the sample's own clip (the latent sample's audio past
the bucket's cut, or before it); "same_speaker" takes a span of another clip whose index row has the
same `speaker` id (make_shards.py's `speaker` field), any clip of that speaker but this one. A sample
with nothing usable (a clip no longer than the bucket, a speaker with one clip, no audio) trains
without a reference. A drawn reference is dropped with `p_drop`, so the model also learns the
reference-free velocity that `voice_scale` guides against (CFG).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from torch import Tensor

from magitrain.data.buckets import FPS
from magitrain.model.layout import REF_AUDIO_MAX_SECONDS, REF_AUDIO_MIN_SECONDS

SOURCES = ("same_clip", "same_speaker")


@dataclass(frozen=True)
class VoiceReference:
    p: float = 0.0  # share of samples drawn a reference (0: off, nothing of this runs)
    p_drop: float = 0.1  # share of drawn references dropped (the reference-free branch of voice_scale)
    source: str = "same_clip"  # same_clip | same_speaker
    min_seconds: float = REF_AUDIO_MIN_SECONDS
    max_seconds: float = REF_AUDIO_MAX_SECONDS

    def __post_init__(self):
        if not (0 <= self.p <= 1 and 0 <= self.p_drop <= 1):
            raise ValueError(
                f"data.voice_reference.p and .p_drop must lie in [0, 1], got {self.p}, {self.p_drop}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"data.voice_reference.source must be one of {SOURCES}, got {self.source!r}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(
                "data.voice_reference needs 0 < min_seconds <= max_seconds, got "
                f"{self.min_seconds}, {self.max_seconds}"
            )

    @property
    def enabled(self) -> bool:
        return self.p > 0

    @property
    def token_range(self) -> tuple[int, int]:
        """(fewest, most) audio latents of a reference: 25 per second."""
        return round(self.min_seconds * FPS), round(self.max_seconds * FPS)

    def wants(self, rng: random.Random) -> bool:
        """Whether this sample gets a reference (drawn, and not dropped): two draws, always made."""
        drawn, kept = rng.random() < self.p, rng.random() >= self.p_drop
        return drawn and kept

    def cut(self, audio: Tensor, target: tuple[int, int], rng: random.Random) -> Tensor:
        """A reference [R, C] from audio latents [N, C] outside the target span [lo, hi) (the whole
        clip for another clip: target (0, 0)); [0, C] when no part outside it is long enough."""
        fewest, most = self.token_range
        lo, hi = target
        parts = [(a, b) for a, b in ((0, lo), (hi, audio.shape[0])) if b - a >= fewest]
        if not parts:
            return audio[:0]
        a, b = rng.choices(parts, weights=[b - a for a, b in parts])[0]
        length = rng.randint(fewest, min(most, b - a))
        start = rng.randint(a, b - length)
        return audio[start : start + length]
