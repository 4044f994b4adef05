"""Weight-free signal checks of a clip: loudness, clipping, silence, flicker, frozen frames and
the video/audio duration mismatch. Each says something is wrong with the signal, none that the
content is right; see docs/evaluation.md."""

from __future__ import annotations

import numpy as np

from magitrain.eval.clip import Clip
from magitrain.eval.sync import cell_motion

GATING_BLOCK_S = 0.4  # BS.1770's gating block
CLIP_LEVEL = 10 ** (-0.1 / 20)  # a sample within 0.1 dB of full scale counts as clipped
SILENCE_DBFS = -60.0  # a window quieter than this (RMS, dB full scale) is silent
SILENCE_WINDOW_S = 0.02
# grey levels (of 255): a frame pair is frozen when no grid cell changed more on average; H.264
# refining a still picture of fine detail changes cells by up to ~1.3
FROZEN_LEVEL = 2.0


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float | None:
    """Integrated loudness (ITU-R BS.1770-4: K-weighted, 400 ms blocks every 100 ms, absolute gate
    -70 LUFS, relative gate -10 LU) of `[channels, samples]` audio (mono or stereo) in LUFS; None
    for audio shorter than one block or entirely below the absolute gate (silence), which have no
    loudness. torchaudio's K-weighting filters; not `torchaudio.functional.loudness`, whose filters
    clip their output at +-1 (a full-scale sine read -3.28 LUFS, not -3.01), nor pyloudnorm, which
    needs scipy (see pyproject.toml)."""
    import torch  # seconds to import: `--help` need not wait for it
    from torchaudio.functional import highpass_biquad, treble_biquad

    block = round(GATING_BLOCK_S * sample_rate)
    if audio.shape[1] <= block:
        return None
    x = torch.from_numpy(audio.astype(np.float64))
    headroom = max(float(x.abs().max()) / 0.25, 1.0)  # the filters are linear: run them at -12 dBFS
    weighted = treble_biquad(x / headroom, sample_rate, 4.0, 1500.0, 1 / np.sqrt(2))
    weighted = highpass_biquad(weighted, sample_rate, 38.0, 0.5) * headroom
    energy = weighted.square().unfold(-1, block, block // 4).mean(-1).sum(0)  # [blocks], channel gains 1
    lufs = -0.691 + 10 * torch.log10(energy)
    loud = lufs > -70.0
    if not loud.any():
        return None
    relative = -0.691 + 10 * torch.log10(energy[loud].mean()) - 10.0
    return float(-0.691 + 10 * torch.log10(energy[loud & (lufs > relative)].mean()))


def clipping_ratio(audio: np.ndarray) -> float:
    """The fraction of samples (all channels) within 0.1 dB of full scale or beyond."""
    return float(np.mean(np.abs(audio) >= CLIP_LEVEL))


def silence_ratio(mono: np.ndarray, sample_rate: int) -> float:
    """The fraction of 20 ms windows whose RMS is below -60 dBFS (a last partial window counts)."""
    size = max(1, round(SILENCE_WINDOW_S * sample_rate))
    padded = np.pad(mono.astype(np.float64), (0, -len(mono) % size))
    rms = np.sqrt(np.mean(padded.reshape(-1, size) ** 2, axis=1))
    return float(np.mean(rms < 10 ** (SILENCE_DBFS / 20)))


def flicker(changes: np.ndarray) -> float:
    """Mean absolute grey-level change between consecutive frames, in [0, 1] (1: black <-> white
    every frame), from `cell_motion`'s `[T, cells]` (its frame 0 is no change). Motion counts too:
    compare clips of like content."""
    return float(changes[1:].mean() / 255) if len(changes) > 1 else 0.0


def frozen_ratio(changes: np.ndarray) -> float:
    """The fraction of consecutive frame pairs in which no grid cell's mean grey level changed by
    more than 2 (of 255): a picture that stands still, though a mouth moving in one cell is not."""
    return float(np.mean(changes[1:].max(axis=1) <= FROZEN_LEVEL)) if len(changes) > 1 else 0.0


def signal_checks(clip: Clip, cells: np.ndarray | None = None) -> dict[str, float | None]:
    """All the checks of this module on `clip`, by their metric names (`cells`: its `cell_motion`,
    when the caller has it already)."""
    changes = cell_motion(clip.frames) if cells is None else cells
    return {
        "loudness_lufs": loudness_lufs(clip.audio, clip.sample_rate),
        "clipping_ratio": clipping_ratio(clip.audio),
        "silence_ratio": silence_ratio(clip.mono, clip.sample_rate),
        "flicker": flicker(changes),
        "frozen_ratio": frozen_ratio(changes),
        "duration_mismatch_s": abs(clip.audio_seconds - clip.video_seconds),
    }
