"""The weight-free lip-sync metric recovers known offsets from real mp4s (H.264 + AAC, written and
read back): synthetic clips whose picture follows the audio envelope, and espeak-ng speech with a
drawn mouth whose opening follows the speech, at 24, 25 and 30 fps; its confidence drops when the
audio comes from another clip."""

import numpy as np
import pytest
import torch

from magitrain.codecs.media import write_mp4
from magitrain.data.synthetic import speak
from magitrain.eval.clip import read_clip
from magitrain.eval.sync import av_sync

OFFSETS = range(-8, 9)
FPS = (24, 25, 30)
SIZE = (48, 64)  # height, width


def bursts(seconds: float, rate: int, seed: int) -> np.ndarray:
    """`[1, samples]`: noise in syllable-like bursts (80-300 ms on, 50-250 ms off, random levels)."""
    rng = np.random.default_rng(seed)
    envelope = np.zeros(round(seconds * rate))
    start = 0
    while start < len(envelope):
        on = int(rng.uniform(0.08, 0.3) * rate)
        ramp = np.sin(np.linspace(0, np.pi, on)) * rng.uniform(0.2, 0.9)
        envelope[start : start + on] = ramp[: len(envelope) - start]
        start += on + int(rng.uniform(0.05, 0.25) * rate)
    return (envelope * rng.uniform(-1, 1, len(envelope)))[None].astype(np.float32)


def frame_levels(audio: np.ndarray, rate: int, fps: float, num_frames: int, start: float = -0.5):
    """`[num_frames]` in [0, 1]: the audio's RMS over the 1/fps window that starts `start` frames
    after each frame's time (-0.5: centred on it), scaled to its maximum."""
    edges = np.round((np.arange(num_frames + 1) + start) * rate / fps).astype(int)
    edges = np.clip(edges, 0, audio.shape[1])
    pairs = zip(edges[:-1], edges[1:], strict=True)
    rms = np.array([np.sqrt(np.mean(audio[0, a:b] ** 2)) if b > a else 0.0 for a, b in pairs])
    return rms / max(rms.max(), 1e-9)


def shifted(audio: np.ndarray, frames: int, rate: int, fps: float) -> np.ndarray:
    """`audio` made `frames` video frames later (negative: earlier), same length."""
    n = round(frames * rate / fps)
    if n >= 0:
        return np.pad(audio, ((0, 0), (n, 0)))[:, : audio.shape[1]]
    return np.pad(audio[:, -n:], ((0, 0), (0, -n)))


def brightness_clip(levels: np.ndarray, seed: int) -> np.ndarray:
    """A grey frame with a square whose brightness follows `levels`, somewhere random."""
    rng = np.random.default_rng(seed)
    frames = np.full((len(levels), *SIZE, 3), 90, np.uint8)
    top, left = rng.integers(0, SIZE[0] - 16), rng.integers(0, SIZE[1] - 16)
    frames[:, top : top + 16, left : left + 16] = (40 + 200 * levels)[:, None, None, None].astype(np.uint8)
    return frames


def mouth_clip(levels: np.ndarray, seed: int) -> np.ndarray:
    """A face-coloured, mildly noisy background (a gradient plus noise in every frame) with a dark
    ellipse, the mouth, at a random place whose height follows `levels`."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    yy, xx = np.mgrid[:h, :w]
    background = np.stack([180 + 30 * xx / w, 140 + 20 * yy / h, 120 + 0 * xx], axis=-1)
    cy, cx = rng.uniform(0.4, 0.75) * h, rng.uniform(0.3, 0.7) * w
    frames = []
    for level in levels:
        half_height = 1 + 7 * level
        inside = ((yy - cy) / half_height) ** 2 + ((xx - cx) / 10) ** 2 <= 1
        frame = background + rng.normal(0, 3, background.shape)
        frame[inside] = (60, 20, 30)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def through_mp4(path, frames: np.ndarray, audio: np.ndarray, rate: int, fps: float):
    write_mp4(path, torch.from_numpy(frames), fps=fps, audio=torch.from_numpy(audio), sample_rate=rate)
    return read_clip(path)


@pytest.fixture(scope="module")
def speech():
    audio, rate = speak("Hello there, this is a short sentence about lip sync and timing.", "en")
    return audio[:, : round(2.0 * rate)], rate


@pytest.mark.parametrize("fps", FPS)
def test_offsets_synthetic(tmp_path, fps):
    """Every offset -8..8 of a square that brightens with noise bursts comes back within 1 frame;
    breaks if the lag's sign is flipped, if the envelope and motion are a frame apart by
    construction, or if AAC priming shifts the audio."""
    rate, seconds = 16000, 2.0
    audio = bursts(seconds, rate, seed=fps)
    frames = brightness_clip(frame_levels(audio, rate, fps, round(seconds * fps)), seed=fps)
    for k in OFFSETS:
        clip = through_mp4(tmp_path / f"a{k}.mp4", frames, shifted(audio, k, rate, fps), rate, fps)
        result = av_sync(clip)
        assert abs(result["av_offset_frames"] - k) <= 1, (fps, k, result)


@pytest.mark.parametrize("fps", FPS)
def test_offsets_speech_mouth(tmp_path, speech, fps):
    """espeak-ng speech with a drawn mouth over a noisy background: every offset -8..8 within 1 frame."""
    audio, rate = speech
    frames = mouth_clip(frame_levels(audio, rate, fps, round(audio.shape[1] / rate * fps)), seed=fps)
    errors = {}
    for k in OFFSETS:
        clip = through_mp4(tmp_path / f"s{k}.mp4", frames, shifted(audio, k, rate, fps), rate, fps)
        errors[k] = av_sync(clip)["av_offset_frames"] - k
    assert all(abs(e) <= 1 for e in errors.values()), (fps, errors)


def test_offsets_half_frame_at_15_fps(tmp_path, speech):
    """At 15 fps, a mouth that follows the audio of the frame's following 1/fps (half a frame from
    the metric's centred windows): every offset within 1 frame. Caught a metric that tried whole
    lags only: its correlations were near 0 at every whole lag and the peak landed at random."""
    audio, rate = speech
    fps = 15
    levels = frame_levels(audio, rate, fps, round(audio.shape[1] / rate * fps), start=0.0)
    frames = mouth_clip(levels, seed=15)
    errors = {}
    for k in OFFSETS:
        clip = through_mp4(tmp_path / f"h{k}.mp4", frames, shifted(audio, k, rate, fps), rate, fps)
        errors[k] = av_sync(clip)["av_offset_frames"] - k
    assert all(abs(e) <= 1 for e in errors.values()), errors


def test_aac_keeps_alignment(tmp_path, speech):
    """An aligned clip reads back at offset 0 at 44.1 kHz and 22.05 kHz (AAC priming and padding
    neither shift nor stretch the track) and the audio is exactly as long as written."""
    audio, rate = speech
    frames = mouth_clip(frame_levels(audio, rate, 25, round(audio.shape[1] / rate * 25)), seed=3)
    clip = through_mp4(tmp_path / "aligned.mp4", frames, audio, rate, 25)
    assert clip.audio.shape[1] == audio.shape[1]
    assert av_sync(clip)["av_offset_frames"] == 0


def test_confidence_drops_for_other_audio(tmp_path):
    """The mouth of a 5 s clip with the audio of another (other speech; noise bursts) scores less
    than half the confidence it scores with its own audio. (Short clips make chance correlations
    larger: over 60 frames unrelated audio reaches ~0.4.)"""
    fps, seconds = 25, 5.0
    audio, rate = speak("Hello there, this is a sentence about lip sync, said slowly and with care.", "en")
    audio = np.pad(audio, ((0, 0), (0, round(seconds * rate))))[:, : round(seconds * rate)]
    frames = mouth_clip(frame_levels(audio, rate, fps, round(seconds * fps)), seed=1)
    own = av_sync(through_mp4(tmp_path / "own.mp4", frames, audio, rate, fps))["av_confidence"]
    other, _ = speak("Completely different words are spoken in this other recording, by one voice.", "en")
    other = np.pad(other, ((0, 0), (0, audio.shape[1])))[:, : audio.shape[1]]
    for i, wrong_audio in enumerate([other] + [bursts(seconds, rate, seed) for seed in (7, 8)]):
        wrong = av_sync(through_mp4(tmp_path / f"other{i}.mp4", frames, wrong_audio, rate, fps))
        assert wrong["av_confidence"] < own / 2, (i, own, wrong)
    assert own > 0.5
