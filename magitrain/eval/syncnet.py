"""Lip sync as SyncNet measures it (`lse_d`, `lse_c`).

SyncNet: J. S. Chung and A. Zisserman, "Out of time: automated lip sync in the wild", ACCV 2016
workshops. The network below is `S` of github.com/joonson/syncnet_python (SyncNetModel.py), layer for
layer, so that its released weights (`data/syncnet_v2.model`, a state dict) load into it. LSE-D and
LSE-C are that repository's `SyncNetInstance.evaluate` numbers, as Wav2Lip (Prajwal et al. 2020) and
the lip-sync papers after it report them: the minimum over audio offsets of -15..15 frames of the
mean audio-video feature distance, and the median over offsets minus that minimum.

Unlike syncnet_python this runs no face detector: it scores the centre square of the frame, which is
the face only in a centred talking-head shot (see docs/evaluation.md).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import load_file
from torch import nn

from magitrain.eval.clip import Clip, ClipError, Reference

FPS = 25  # SyncNet's video rate: one video frame per 4 MFCC frames (10 ms each)
AUDIO_RATE = 16000
WINDOW = 5  # video frames per SyncNet input (0.2 s; 20 MFCC frames)
VSHIFT = 15  # offsets searched, in frames each way (syncnet_python's and Wav2Lip's default)
CROP = 224
BATCH = 20


def _conv(conv: nn.Module, norm: nn.Module, pool: nn.Module | None = None) -> list[nn.Module]:
    return [conv, norm, nn.ReLU(inplace=True), *([pool] if pool else [])]


class SyncNet(nn.Module):
    """syncnet_python's `S`: 5 video frames `[B, 3, 5, 224, 224]` (BGR, 0-255) and 20 MFCC frames
    `[B, 1, 13, 20]` to one 1024-d embedding each (`forward_lip`, `forward_aud`). The layer order is
    the original's, so the state-dict keys are too."""

    def __init__(self, features: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64), nn.MaxPool2d(1, 1)),
            *_conv(nn.Conv2d(64, 192, 3, padding=1), nn.BatchNorm2d(192), nn.MaxPool2d(3, (1, 2))),
            *_conv(nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
            *_conv(nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
            *_conv(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.MaxPool2d(3, 2)),
            *_conv(nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512)),
        )
        self.netfcaud = self._head(features)
        self.netfclip = self._head(features)
        self.netcnnlip = nn.Sequential(
            *_conv(
                nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), nn.BatchNorm3d(96), nn.MaxPool3d((1, 3, 3), (1, 2, 2))
            ),
            *_conv(
                nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
                nn.BatchNorm3d(256),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            ),
            *_conv(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv(
                nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
                nn.BatchNorm3d(256),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            ),
            *_conv(nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512)),
        )

    @staticmethod
    def _head(features: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, features))

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(path: str | Path) -> SyncNet:
    """SyncNet with the weights of `path`: a state dict as `.safetensors`, or as a torch file (the
    original `syncnet_v2.model` is one) read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SyncNet weights: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        if "Unsupported global" not in str(exn):  # not a pickle of classes: not weights at all
            raise ValueError(f"SyncNet weights: {path} is not a weights file ({exn})") from exn
        raise ValueError(
            f"SyncNet weights: {path} holds more than tensors (a pickled module?); convert it once to "
            "safetensors in an environment you trust (docs/evaluation.md)"
        ) from exn
    except Exception as exn:  # torch.load on a non-checkpoint raises anything from KeyError to RuntimeError
        raise ValueError(
            f"SyncNet weights: {path} is not a weights file ({type(exn).__name__}: {exn})"
        ) from exn
    if not isinstance(state, dict):
        raise ValueError(f"SyncNet weights: {path} holds a {type(state).__name__}, not a state dict")
    net = SyncNet()
    try:
        net.load_state_dict(state)
    except RuntimeError as exn:  # missing, unexpected or misshapen tensors, all listed
        raise ValueError(f"SyncNet weights: {path} does not fit SyncNet: {exn}") from exn
    return net


def _dct_ii(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix `[n, n]` (scipy.fft.dct(x, type=2, norm="ortho") is x @ it.T).
    Written out to keep scipy out of the environment: torchmetrics imports scipy.signal wherever
    scipy is installed, a second of every Lightning process's start."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * k * (2 * i + 1) / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


def mfcc(signal: np.ndarray, rate: int = AUDIO_RATE) -> np.ndarray:
    """`[frames, 13]` MFCCs, one per 10 ms: `python_speech_features.mfcc(signal, rate)` with its
    defaults, the features SyncNet was trained on (25 ms unwindowed frames, the last zero-padded;
    pre-emphasis 0.97; 512-point power spectrum; 26 mel filters on FFT bins; log; orthonormal DCT-II;
    lifter 22; c0 replaced by the log frame energy). Written out because that package is not a
    dependency and torchaudio's MFCC differs in every one of those choices. `signal`: at 16-bit scale."""
    signal = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    length, step = round(0.025 * rate), round(0.01 * rate)
    count = 1 + max(0, int(np.ceil((len(signal) - length) / step)))
    signal = np.pad(signal, (0, (count - 1) * step + length - len(signal)))
    frames = np.lib.stride_tricks.sliding_window_view(signal, length)[::step][:count]
    power = np.abs(np.fft.rfft(frames, 512)) ** 2 / 512
    tiny = np.finfo(float).eps
    energy = power.sum(axis=1)
    bands = power @ _mel_filters(rate).T
    cepstra = np.log(np.where(bands == 0, tiny, bands)) @ _dct_ii(bands.shape[1])[:13].T
    cepstra *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    cepstra[:, 0] = np.log(np.where(energy == 0, tiny, energy))
    return cepstra


def _mel_filters(rate: int, nfft: int = 512, count: int = 26) -> np.ndarray:
    """python_speech_features' triangular mel filters `[count, nfft // 2 + 1]`, edges on whole FFT bins."""
    mels = np.linspace(0, 2595 * np.log10(1 + rate / 2 / 700), count + 2)
    edges = np.floor((nfft + 1) * 700 * (10 ** (mels / 2595) - 1) / rate)
    filters = np.zeros((count, nfft // 2 + 1))
    for j, (low, mid, high) in enumerate(zip(edges, edges[1:], edges[2:], strict=False)):
        rise, fall = np.arange(int(low), int(mid)), np.arange(int(mid), int(high))
        filters[j, rise] = (rise - low) / (mid - low)
        filters[j, fall] = (high - fall) / (high - mid)
    return filters


def at_rate(frames: np.ndarray, fps: float, rate: float = FPS) -> np.ndarray:
    """`frames` resampled in time to `rate` (the nearest frame; ffmpeg `-r 25` as syncnet_python does)."""
    count = max(1, round(len(frames) * rate / fps))
    return frames[np.minimum(np.round(np.arange(count) * fps / rate).astype(int), len(frames) - 1)]


def centre_crops(frames: np.ndarray) -> torch.Tensor:
    """`[3, T, 224, 224]` float BGR 0-255 (SyncNet's input: syncnet_python reads frames with OpenCV):
    the centre square of each RGB frame, resized."""
    height, width = frames.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = torch.from_numpy(frames[:, top : top + side, left : left + side]).permute(0, 3, 1, 2).float()
    crops = F.interpolate(square, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)
    return crops.flip(1).permute(1, 0, 2, 3).clamp(0, 255)


def offset_distances(video: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> torch.Tensor:
    """`[2 * vshift + 1]`: for each offset k in -vshift..vshift, the mean over frames i of the distance
    between video feature i and audio feature i + k (a zero vector past either end), as
    syncnet_python's `calc_pdist` and `evaluate` compute it."""
    padded = F.pad(audio, (0, 0, vshift, vshift))
    windows = padded.unfold(0, 2 * vshift + 1, 1).transpose(1, 2)  # [frames, offsets, features]
    return F.pairwise_distance(video[:, None].expand_as(windows), windows).mean(dim=0)


class SyncNetScore:
    """`metric(clip, reference) -> {"lse_d", "lse_c"}` (`reference` unused). LSE-D: the smallest mean
    distance over offsets (lower: better sync); LSE-C: the median over offsets minus it (higher: a
    clearer best offset). The clip is brought to 25 fps and 16 kHz mono first, as syncnet_python's
    ffmpeg step does. `path`: the SyncNet weights (`load_syncnet`)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.model = load_syncnet(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def metric(self, clip: Clip, reference: Reference | None = None) -> dict[str, float]:
        frames = at_rate(clip.frames, clip.fps)
        audio = torchaudio.functional.resample(torch.from_numpy(clip.mono), clip.sample_rate, AUDIO_RATE)
        cepstra = torch.from_numpy(mfcc(audio.double().numpy() * 32768)).float().T  # [13, mfcc frames]
        length = min(len(frames), len(audio) // (AUDIO_RATE // FPS))
        if length <= WINDOW:
            raise ClipError(
                f"{clip.name}: too short for SyncNet (needs more than {WINDOW} frames at {FPS} fps)"
            )
        video_features, audio_features = [], []
        for start in range(0, length - WINDOW, BATCH):
            stop = min(length - WINDOW, start + BATCH)
            crops = centre_crops(frames[start : stop + WINDOW - 1]).to(self.device)
            clips = torch.stack([crops[:, i : i + WINDOW] for i in range(stop - start)])
            sounds = torch.stack([cepstra[None, :, 4 * v : 4 * v + 20] for v in range(start, stop)])
            video_features.append(self.model.forward_lip(clips).cpu())
            audio_features.append(self.model.forward_aud(sounds.to(self.device)).cpu())
        distances = offset_distances(torch.cat(video_features), torch.cat(audio_features))
        lse_d = distances.min()
        return {"lse_d": float(lse_d), "lse_c": float(distances.median() - lse_d)}
