"""The part of a raw clip that trains: the span its video and audio both cover, under the A/V policies.

Real footage often has an audio track that starts late, ends early, or runs on after the video.
A clip's index row records the video `duration` and, for the audio, `audio_start` (seconds after
the first video frame; negative if the audio starts first) and `audio_duration`. From these and
the policies (`data.av_mismatch`, `data.av_tolerance`, `data.missing_audio`; docs/data.md) this
module decides, from metadata alone, the span a clip is cut from: the planner picks the bucket
from it and the decoder cuts exactly it, so a clip the plan accepts never turns out too short.

Alignment: a span of n frames at 25 fps covers n/25 s of time. A bucket of F frames takes F of
them and F/25 s of audio (F x 2048 samples at 51.2 kHz), one audio token per video frame, the
same count inference uses (`magitrain.inference.ClipShape`).
"""

import math
from dataclasses import dataclass

from magitrain.data.buckets import FPS

AV_MISMATCH = ("crop", "pad_silence", "drop")
MISSING_AUDIO = ("mask", "silence", "drop")


@dataclass(frozen=True)
class AVPolicy:
    """crop: cut both tracks to the span they share. pad_silence: keep the whole video when at most
    `tolerance` s of it lacks audio, and fill that with silence (beyond it: crop). drop: leave out
    a clip whose tracks differ by more than `tolerance` s (within it: crop).
    missing_audio (clips without any audio): mask (train video only, the audio loss is masked),
    silence (train the audio on encoded silence) or drop."""

    av_mismatch: str = "crop"
    av_tolerance: float = 0.5
    missing_audio: str = "mask"

    def __post_init__(self):
        if self.av_mismatch not in AV_MISMATCH:
            raise ValueError(f"data.av_mismatch must be one of {AV_MISMATCH}, got {self.av_mismatch!r}")
        if self.missing_audio not in MISSING_AUDIO:
            raise ValueError(f"data.missing_audio must be one of {MISSING_AUDIO}, got {self.missing_audio!r}")
        if self.av_tolerance < 0:
            raise ValueError(f"data.av_tolerance must be >= 0 seconds, got {self.av_tolerance}")


@dataclass(frozen=True)
class Span:
    """`frames` 25 fps frames starting at video frame `first` (time first/25 s)."""

    first: int
    frames: int
    has_audio: bool

    @property
    def start(self) -> float:
        return self.first / FPS


class Unplanned(Exception):
    """A clip the policies leave out of the plan; `reason` is what it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def clip_span(row: dict, policy: AVPolicy) -> Span:
    """The span of a raw index row that the policies keep; raises Unplanned if there is none.

    Rows of older indexes without the audio fields are taken as audio covering the video.
    """
    video = float(row["duration"])
    if not row.get("has_audio", True):
        if policy.missing_audio == "drop":
            raise Unplanned("missing_audio", "no audio track or audio member (data.missing_audio=drop)")
        return _span(0.0, video, has_audio=False)
    a_start = float(row.get("audio_start", 0.0))
    a_end = a_start + float(row.get("audio_duration", video - a_start))
    start, end = max(0.0, a_start), min(video, a_end)
    if end <= start:
        raise Unplanned(
            "too_short", f"audio [{a_start:.2f}, {a_end:.2f}] s and video [0, {video:.2f}] s do not overlap"
        )
    video_without_audio = video - (end - start)
    audio_without_video = (a_end - a_start) - (end - start)
    if policy.av_mismatch == "drop" and max(video_without_audio, audio_without_video) > policy.av_tolerance:
        raise Unplanned(
            "av_mismatch",
            f"audio [{a_start:.2f}, {a_end:.2f}] s vs video [0, {video:.2f}] s differ by more than "
            f"data.av_tolerance={policy.av_tolerance} s (data.av_mismatch=drop)",
        )
    if policy.av_mismatch == "pad_silence" and video_without_audio <= policy.av_tolerance:
        return _span(0.0, video, has_audio=True)
    return _span(start, end, has_audio=True)


def _span(start: float, end: float, has_audio: bool) -> Span:
    first = math.ceil(start * FPS - 1e-6)
    return Span(first, max(0, math.floor((end - first / FPS) * FPS + 1e-6)), has_audio)
