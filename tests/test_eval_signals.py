"""The weight-free signal checks give known answers, on arrays and through real mp4s (H.264 + AAC)."""

import numpy as np
import pytest
import torch

from magitrain.codecs.media import write_mp4
from magitrain.data.synthetic import make_speech_clip
from magitrain.eval.clip import read_clip
from magitrain.eval.signals import (
    CLIP_LEVEL,
    clipping_ratio,
    flicker,
    frozen_ratio,
    loudness_lufs,
    signal_checks,
    silence_ratio,
)
from magitrain.eval.sync import cell_motion

RATE = 48000


def sine(amplitude: float, seconds: float, rate: int = RATE, hz: float = 997.0) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate))[None]


def moving(num: int, seed: int = 0) -> np.ndarray:
    """`[num, 32, 48, 3]` frames of fresh noise: every cell changes every frame."""
    return np.random.default_rng(seed).integers(0, 256, (num, 32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("amplitude", [1.0, 0.5, 0.1])
def test_loudness_of_a_sine(amplitude):
    """BS.1770: a 997 Hz sine of peak A on one channel is 20 log10(A) - 3.01 LUFS; two identical
    channels add 3 dB."""
    expected = 20 * np.log10(amplitude) - 3.01
    assert loudness_lufs(sine(amplitude, 3.0), RATE) == pytest.approx(expected, abs=0.1)
    stereo = np.concatenate([sine(amplitude, 3.0)] * 2)
    assert loudness_lufs(stereo, RATE) == pytest.approx(expected + 3.01, abs=0.1)


def test_loudness_without_a_value():
    """Silence (below the -70 LUFS gate) and audio shorter than the 400 ms block have no loudness:
    None, which JSON writes as null (-inf would not be JSON)."""
    assert loudness_lufs(np.zeros((1, 3 * RATE)), RATE) is None
    assert loudness_lufs(sine(0.5, 0.3), RATE) is None


def test_clipping_ratio():
    """A sine driven to twice full scale and clipped: the share of its samples at full scale is
    the share of phases where |2 sin| >= the clip level; an unclipped one has none."""
    hot = np.clip(sine(2.0, 1.0), -1, 1)
    expected = 1 - 2 / np.pi * np.arcsin(CLIP_LEVEL / 2)
    assert clipping_ratio(hot) == pytest.approx(expected, abs=0.002)
    assert clipping_ratio(sine(0.9, 1.0)) == 0.0


def test_silence_ratio():
    """One second of tone, then one of silence: half silent; all tone: none; all silence: all."""
    rate = 16000
    half = np.concatenate([sine(0.3, 1.0, rate)[0], np.zeros(rate)])
    assert silence_ratio(half, rate) == pytest.approx(0.5, abs=0.01)
    assert silence_ratio(sine(0.3, 1.0, rate)[0], rate) == 0.0
    assert silence_ratio(np.zeros(rate), rate) == 1.0


def test_flicker_and_frozen_on_arrays():
    """Black and white frames in turn: flicker 1; a still clip: flicker 0, all frozen; 10 moving
    frames then 10 copies of the last one: 10 of the 19 frame pairs frozen."""
    blink = np.zeros((6, 16, 16, 3), np.uint8)
    blink[1::2] = 255
    assert flicker(cell_motion(blink)) == pytest.approx(1.0)
    still = np.repeat(moving(1), 8, axis=0)
    assert flicker(cell_motion(still)) == 0.0 and frozen_ratio(cell_motion(still)) == 1.0
    frames = moving(10)
    half_frozen = np.concatenate([frames, np.repeat(frames[-1:], 10, axis=0)])
    assert frozen_ratio(cell_motion(half_frozen)) == pytest.approx(10 / 19)
    assert frozen_ratio(cell_motion(moving(12))) == 0.0


def test_a_small_moving_mouth_is_not_frozen():
    """A 16x12-pixel patch changing by 25 grey levels a frame in a 256x256 still picture changes the
    picture by 0.07 on average, yet the frames are not frozen (the check looks at grid cells)."""
    frames = np.repeat(moving(1), 10, axis=0).repeat(8, axis=1).repeat(6, axis=2)[:, :256, :256]
    for i in range(10):
        frames[i, 100:112, 120:136] = 25 * i
    assert frozen_ratio(cell_motion(frames)) == 0.0


def test_checks_through_mp4(tmp_path):
    """Through H.264 + AAC: a still picture with 1 s of tone then 1 s of silence at 0.5 peak reads as
    frozen, half silent, as loud as the written track, unclipped, with matching durations; 1.5 s of audio
    under 2 s of video is a 0.5 s mismatch."""
    rate, fps = 44100, 25
    audio = np.concatenate([sine(0.5, 1.0, rate), np.zeros((1, rate))], axis=1).astype(np.float32)
    still = torch.from_numpy(np.repeat(moving(1), 2 * fps, axis=0))
    write_mp4(tmp_path / "still.mp4", still, fps, torch.from_numpy(audio), rate)
    checks = signal_checks(read_clip(tmp_path / "still.mp4"))
    assert checks["frozen_ratio"] == 1.0 and checks["flicker"] < 0.002
    assert checks["silence_ratio"] == pytest.approx(0.5, abs=0.02)
    # the gated blocks that straddle the tone's end lower it below the tone's own -9.03 LUFS
    assert checks["loudness_lufs"] == pytest.approx(loudness_lufs(audio, rate), abs=0.2)
    assert checks["clipping_ratio"] == 0.0
    assert checks["duration_mismatch_s"] == pytest.approx(0.0, abs=1e-3)
    short = torch.from_numpy(audio[:, : round(1.5 * rate)])
    write_mp4(tmp_path / "short.mp4", torch.from_numpy(moving(2 * fps)), fps, short, rate)
    checks = signal_checks(read_clip(tmp_path / "short.mp4"))
    assert checks["duration_mismatch_s"] == pytest.approx(0.5, abs=1e-3)
    assert checks["frozen_ratio"] == 0.0 and checks["flicker"] > 0.2


def test_late_track_sits_on_the_video_timeline(tmp_path):
    """A track that starts 0.5 s after the first frame (as in real footage) reads with 0.5 s of
    leading silence: its speech starts at ~0.5 s, and 2.4 s of video against a 1.5 s track ending
    at 2.0 s is a 0.4 s mismatch (reading the track from 0 would say 0.9 s and put the speech
    half a second early, which the lip-sync metric would score as 12 frames off)."""
    make_speech_clip(
        tmp_path / "late.mp4", "This track starts late.", seconds=2.4, audio_seconds=1.5, audio_start=0.5
    )
    clip = read_clip(tmp_path / "late.mp4")
    onset = np.argmax(np.abs(clip.mono) > 0.01) / clip.sample_rate
    assert 0.49 <= onset <= 0.56
    assert signal_checks(clip)["duration_mismatch_s"] == pytest.approx(0.4, abs=0.005)
