"""The given modality of audio-driven video (`audio=FILE`) and video-to-audio (`video=FILE`): the
files read, checked and cut to the clip they set; and the voice reference of `voice=FILE`.

Audio is read as the release's `load_audio_and_encode` reads it: mono at the audio codec's rate
(51.2 kHz; `AudioCodec.encode` duplicates it to stereo and encodes audio longer than its 29 s
window in windows with 50% overlap). A clip of d seconds of audio has the codec's
`round(25 d) + 1` latent frames, the alignment of the training data (the release: `ceil(25 d)`).
Video is read at 25 fps (another rate is resampled by the frame nearest in time, with a log line):
F frames make a clip of F frames. `seconds` trims either. A file that cannot be used is a
UserError naming the key and the file.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor

from magitrain.codecs.audio import LATENT_RATE
from magitrain.codecs.media import nearest_frames, read_audio, resize_cover_crop
from magitrain.errors import UserError
from magitrain.model.layout import REF_AUDIO_MAX_SECONDS, REF_AUDIO_MIN_SECONDS

from .shapes import FPS, ClipShape

log = logging.getLogger("magitrain")

SILENT_PEAK = 1e-4  # -80 dBFS: a track whose every sample stays below this holds nothing to follow


def check_given(
    audio: str | None, video: str | None, image: str | None, sr: str | None, voice: str | None = None
) -> None:
    """The combinations that make no clip, and missing files: before any network loads."""
    if audio and video:
        raise UserError("give audio=FILE (audio-driven video) or video=FILE (video-to-audio), not both")
    if video and image is not None:
        raise UserError(f"video={video} gives every frame: image= has no frame left to set")
    if video and sr:
        raise UserError(f"video={video} keeps the given pictures: sr={sr} has no video to refine")
    if voice and audio:
        raise UserError(f"audio={audio} gives the clip's sound: voice={voice} has no speech left to shape")
    for key, path in (("audio", audio), ("video", video), ("voice", voice)):
        if path and not Path(path).is_file():
            raise UserError(f"{key}={path}: no such file")


def read_audio_file(path: str | Path, rate: int, seconds: float | None = None, key: str = "audio") -> Tensor:
    """[1, S] mono float at `rate`: the file's audio (any format FFmpeg reads), its first `seconds`.

    S spans the container's duration, the samples placed by their timestamps (an mp3's encoder
    delay stays a delay; a file shorter than it claims ends in zeros). Errors name `key`=path."""
    data = _read_bytes(path, key)
    try:
        with av.open(io.BytesIO(data)) as container:
            duration = container.duration
        if duration is None:
            raise ValueError("its length is unknown")
        length = math.ceil(duration / av.time_base * rate)
        if seconds is not None:
            length = min(length, round(seconds * rate))
        wave, covered = read_audio(data, False, 0.0, length, rate)
    except (av.error.FFmpegError, ValueError) as err:
        raise UserError(f"{key}={path}: not a readable audio file ({err})") from None
    if covered < rate / LATENT_RATE:
        raise UserError(
            f"{key}={path}: {covered / rate:.3f} s of audio, shorter than one latent frame "
            f"({1 / LATENT_RATE} s)"
        )
    if wave.abs().max() < SILENT_PEAK:
        raise UserError(f"{key}={path} is silent: there is no sound to follow")
    return wave


def read_voice_file(path: str | Path, rate: int) -> Tensor:
    """[1, S] mono float at `rate`: the voice reference of `voice=` (any format FFmpeg reads), 1 to
    10 s as the model is trained on (`magitrain.model.layout`'s reference lengths); a longer one is
    clipped to its first 10 s with a log line, a shorter or silent one is a UserError."""
    wave = read_audio_file(path, rate, None, "voice")
    seconds, shortest, longest = wave.shape[-1] / rate, REF_AUDIO_MIN_SECONDS, REF_AUDIO_MAX_SECONDS
    if seconds < shortest:
        raise UserError(f"voice={path}: {seconds:.2f} s of audio, under the {shortest:g} s a voice needs")
    if seconds > longest:
        log.info("voice=%s is %.1f s long: its first %g s are the reference", path, seconds, longest)
        wave = wave[:, : round(longest * rate)]
    if wave.abs().max() < SILENT_PEAK:
        raise UserError(f"voice={path} is silent in its first {longest:g} s: there is no voice to follow")
    return wave


def read_video_file(path: str | Path, seconds: float | None = None) -> Tensor:
    """[F, H, W, 3] uint8 at 25 fps, the source's size: its first `seconds * 25 + 1` frames when given
    (a clip of F frames lasts (F - 1) / 25 s, `ClipShape`'s rule). At least 2 frames."""
    limit = math.inf if seconds is None else seconds + 1 / FPS
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or FPS)
            pictures, times = [], []
            for frame in container.decode(stream):
                if times and frame.time - times[0] >= limit:
                    break
                pictures.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.time)
    except (av.error.FFmpegError, ValueError) as err:
        raise UserError(f"video={path}: not a readable video file ({err})") from None
    count = math.ceil((times[-1] - times[0] + 1 / rate) * FPS - 1e-6) if times else 0  # frames at 25 fps
    if seconds is not None:
        count = min(count, round(seconds * FPS) + 1)
    if count < 2:
        raise UserError(
            f"video={path}: {len(times)} frame(s); video-to-audio needs a clip (image= takes one)"
        )
    if abs(rate - FPS) > 1e-3:
        log.info("video=%s is %.3g fps: resampled to %d fps (the frame nearest in time)", path, rate, FPS)
    picked = nearest_frames(np.asarray(times) - times[0], np.arange(count) / FPS)
    return torch.from_numpy(np.stack(pictures)[picked])


def clip_frames(frames: Tensor, clip: ClipShape) -> Tensor:
    """The given frames the clip's video latent holds: the first 4(T-1)+1 of them (the VAE takes
    4k+1), resized to cover the clip's size and centre-cropped ([F, H, W, 3] uint8)."""
    count = 4 * (clip.latent_frames - 1) + 1
    resized = resize_cover_crop(frames[:count].permute(0, 3, 1, 2), (clip.height, clip.width))
    return resized.permute(0, 2, 3, 1).contiguous()


def output_track(path: str | Path, seconds: float, rate: int, length: int) -> Tensor:
    """The given audio as the mp4 carries it: read again at the output `rate` (one resampling from
    the source), the clip's `seconds`, two channels, zero-padded to `length` samples (the decoded
    track's, which spans every latent frame)."""
    wave = read_audio_file(path, rate, seconds)[:, :length]
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1])).expand(2, -1)


def _read_bytes(path: str | Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{key}={path}: {err.strerror or err}") from None
