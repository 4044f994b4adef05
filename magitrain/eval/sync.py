"""Weight-free audio-video synchrony: `av_offset_frames` and `av_confidence`.

The audio's onset envelope (the frame-to-frame change of its loudness, sampled at the video's
fps) is cross-correlated with the video's motion energy (the frame-to-frame change of the region
that moves most) over lags -N..N frames. Both signals are "how much changed between frame i-1
and frame i", so they line up at lag 0 when a mouth opens and closes with the sound it makes.
The lag of the correlation peak is the offset (positive: the audio comes later than the
picture); the peak minus the median over lags is the confidence (SyncNet's LSE-C, on these
signals). See docs/evaluation.md for what this can and cannot tell.
"""

from __future__ import annotations

import numpy as np

from magitrain.eval.clip import Clip

GRID = 8  # the frame is split into GRID x GRID cells to find the region that moves most
TOP_CELLS = 4  # the cells whose motion varies most: a mouth, not the whole (static or noisy) frame
SUBSTEPS = 4  # lags are searched in quarter frames (see lag_correlations)


def audio_onsets(audio: np.ndarray, sample_rate: int, fps: float):
    """A function of frame times t (fractional allowed) giving the change of the audio's RMS from
    frame time t-1 to t. The RMS at t is over the 1/fps window centred on t/fps; samples outside
    the track count as silence."""
    squares = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    per_frame = sample_rate / fps

    def rms(centres: np.ndarray) -> np.ndarray:
        low = np.clip(np.round((centres - 0.5) * per_frame).astype(np.int64), 0, len(audio))
        high = np.clip(np.round((centres + 0.5) * per_frame).astype(np.int64), 0, len(audio))
        return np.sqrt((squares[high] - squares[low]) / np.maximum(high - low, 1))

    return lambda times: np.abs(rms(times) - rms(times - 1))


def cell_motion(frames: np.ndarray, grid: int = GRID) -> np.ndarray:
    """`[T, cells]`: the mean absolute change of the grey level (0-255) of each cell of a
    `grid` x `grid` split between frame i-1 and frame i (0 for frame 0). One frame in memory as
    float at a time: a 1080p clip costs no more than its uint8 frames."""
    num, height, width = frames.shape[:3]
    rows = np.array_split(np.arange(height), min(grid, height))
    cols = np.array_split(np.arange(width), min(grid, width))
    area = np.outer([len(r) for r in rows], [len(c) for c in cols])
    cells = np.zeros((num, len(rows), len(cols)))
    previous = _grey(frames[0])
    for i in range(1, num):
        current = _grey(frames[i])
        change = np.abs(current - previous)
        # the sum over each cell: rows within each row band, then columns within each column band
        by_rows = np.add.reduceat(change, [r[0] for r in rows], axis=0)
        cells[i] = np.add.reduceat(by_rows, [c[0] for c in cols], axis=1) / area
        previous = current
    return cells.reshape(num, -1)


def motion_energy(cells: np.ndarray, top: int = TOP_CELLS) -> np.ndarray:
    """`[T]`: `cell_motion`'s `[T, cells]` summed over the `top` cells whose change varies most over
    the clip. A static or evenly noisy background varies little; a moving mouth varies a lot."""
    chosen = np.argsort(cells[1:].std(axis=0) if len(cells) > 1 else cells.std(axis=0))[-top:]
    return cells[:, chosen].sum(axis=1)


def _grey(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def lag_correlations(picture: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float, max_lag: int):
    """(lags, correlations): the Pearson correlation of the motion `picture[t]` with the audio's onsets
    at frame time t + lag, for lags -max_lag..max_lag in steps of 1/SUBSTEPS frame, over the frames
    t >= 1 whose t + lag lies within the clip (0 where fewer than 3 frames overlap, or where either
    signal is constant: a still picture, silence). Fractional lags matter: at 15 fps a mouth drawn
    half a frame off the audio windows correlates near 0 at every whole lag."""
    lags = np.arange(-max_lag * SUBSTEPS, max_lag * SUBSTEPS + 1) / SUBSTEPS
    frames = np.arange(len(picture))
    onsets = audio_onsets(audio, sample_rate, fps)
    out = np.zeros(len(lags))
    for j, lag in enumerate(lags):
        t = frames[(frames >= 1) & (frames + lag >= 1) & (frames + lag <= len(picture) - 1)]
        if len(t) < 3:
            continue
        a, b = picture[t] - picture[t].mean(), onsets(t + lag)
        b = b - b.mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        out[j] = (a * b).sum() / denominator if denominator > 1e-12 else 0.0
    return lags, out


def av_sync(clip: Clip, max_lag: int = 10, cells: np.ndarray | None = None) -> dict[str, float]:
    """`{"av_offset_frames": the whole lag nearest the peak (positive: audio later),
    "av_confidence": the peak minus the median over lags}` of `clip`; see the module docstring.
    A still picture or a silent track correlates with nothing: offset None, confidence 0.
    `cells`: the clip's `cell_motion`, when the caller has it already."""
    if max_lag < 1:
        raise ValueError(f"eval.max_lag must be at least 1, got {max_lag}")
    picture = motion_energy(cell_motion(clip.frames) if cells is None else cells)
    lags, corr = lag_correlations(picture, clip.mono, clip.sample_rate, clip.fps, max_lag)
    if not corr.any():
        return {"av_offset_frames": None, "av_confidence": 0.0}
    peak = int(np.argmax(corr))
    # a peak half a frame off (a picture drawn from the audio of [i/fps, (i+1)/fps), the usual way
    # to cut audio per frame, peaks at +0.5) rounds down: such a clip in sync reads 0
    offset = int(np.ceil(lags[peak] - 0.5))
    return {"av_offset_frames": offset, "av_confidence": float(corr[peak] - np.median(corr))}
