"""One clip as the metrics read it: decoded RGB frames and mono audio with their rates, and the
text it was made from."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」')


class ClipError(Exception):
    """A clip that cannot be scored (unreadable, no audio stream, ...): its message names why."""


@dataclass
class Clip:
    """`frames` `[T, H, W, 3]` uint8 at `fps`; `audio` `[channels, samples]` float32 in [-1, 1] at
    `sample_rate` (`mono`: their mean). The durations are the streams' own, to compare them
    (`duration_mismatch_s`)."""

    name: str
    frames: np.ndarray
    fps: float
    audio: np.ndarray
    sample_rate: int

    @property
    def mono(self) -> np.ndarray:
        return self.audio.mean(axis=0)

    @property
    def video_seconds(self) -> float:
        return len(self.frames) / self.fps

    @property
    def audio_seconds(self) -> float:
        return self.audio.shape[1] / self.sample_rate


@dataclass
class Reference:
    """What a clip should show and say: `prompt` (its text), `speech` (the words it should speak;
    None: the quoted text of the prompt, see `expected_speech`), `language` (ISO code; zh/ja: CER),
    `voice` (the audio file of the voice it should speak in: infer.py's `voice=`)."""

    prompt: str = ""
    speech: str | None = None
    language: str | None = None
    voice: str | None = None

    @property
    def expected_speech(self) -> str | None:
        """`speech`, else the prompt's quoted passages ("...", “...”, 「...」) joined by
        spaces, else None (nothing to score speech against)."""
        if self.speech is not None:
            return self.speech
        quoted = _QUOTED.findall(self.prompt)
        return " ".join(next(filter(None, q)) for q in quoted) if quoted else None


def read_clip(path: str | Path) -> Clip:
    """Decode an mp4 (any fps, size, audio layout) into a `Clip`; `ClipError` names what is wrong.

    The audio is placed on the video's timeline: a track that starts late gets leading silence
    (one that starts early loses its head), and the AAC encoder's padding after the last sample
    (up to 1024 samples) is cut at the stream's recorded duration. Without that a perfectly
    matched clip would read as up to 64 ms (at 16 kHz) longer in audio than in video."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(f"{path.name}: no video stream")
            if not container.streams.audio:
                raise ClipError(f"{path.name}: no audio stream")
            vstream = container.streams.video[0]
            fps = float(vstream.average_rate or vstream.guessed_rate or 0)
            decoded = list(container.decode(vstream))
            video_start = decoded[0].time if decoded and decoded[0].time is not None else 0.0
            frames = np.stack([f.to_ndarray(format="rgb24") for f in decoded]) if decoded else np.zeros(0)
        with av.open(str(path)) as container:
            astream = container.streams.audio[0]
            rate = astream.codec_context.sample_rate
            starts: list[float] = []
            chunks = [frame.to_ndarray() for frame in _planar(container.decode(astream), starts)]
            recorded = astream.duration * astream.time_base if astream.duration else None
    except ClipError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exn:
        raise ClipError(f"{path.name}: unreadable ({type(exn).__name__}: {exn})") from exn
    if not len(frames) or fps <= 0:
        raise ClipError(f"{path.name}: the video stream has no frames")
    audio = np.concatenate(chunks, axis=1).astype(np.float32) if chunks else np.zeros((1, 0), np.float32)
    if recorded is not None:
        audio = audio[:, : round(float(recorded) * rate)]
    if not audio.shape[1]:
        raise ClipError(f"{path.name}: the audio stream has no samples")
    lead = round(((starts[0] if starts else 0.0) - video_start) * rate)
    audio = np.pad(audio, ((0, 0), (lead, 0))) if lead > 0 else audio[:, -lead:]
    return Clip(path.name, frames, fps, audio, rate)


def _planar(frames, starts: list[float]):
    """Audio frames as planar float32 `[channels, n]`, whatever the stream's sample format; the
    first frame's presentation time (seconds) is appended to `starts`."""
    resampler = None
    for frame in frames:
        if resampler is None:
            starts.append(frame.time or 0.0)
            resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=frame.sample_rate)
        yield from resampler.resample(frame)
    if resampler is not None:
        yield from resampler.resample(None)
