"""Media helpers shared by the codecs, the data pipeline and inference.

Frames are resized to *cover* the target and centre-cropped (never letterboxed or stretched),
resampled to 25 fps by the frame nearest in presentation time, and written as H.264 (yuv420p) +
AAC mp4 through PyAV. Reference images are prepared as the release prepares them (`reference_image`).
Audio is decoded with PyAV and resampled with FFmpeg to mono (`read_audio`): the training data's
tracks and the given audio of audio-driven generation.
"""

import io
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize_cover_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize `[F, 3, H, W]` frames to cover `size = (height, width)`, keep aspect, centre-crop.

    Bilinear with antialiasing (downscaling without it aliases badly); returns the input dtype.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"resize_cover_crop expects frames [F, 3, H, W], got {tuple(frames.shape)}")
    out_h, out_w = size
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize_cover_crop: target size must be positive, got {size}")
    in_h, in_w = frames.shape[-2:]
    scale = max(out_h / in_h, out_w / in_w)
    # ceil so that float error never leaves the scaled image one pixel short of the target
    new_h, new_w = max(out_h, math.ceil(in_h * scale - 1e-6)), max(out_w, math.ceil(in_w * scale - 1e-6))
    x = frames.float()
    if (new_h, new_w) != (in_h, in_w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[:, :, top : top + out_h, left : left + out_w]
    if frames.dtype == torch.uint8:
        return x.round().clamp(0, 255).to(torch.uint8)
    return x.to(frames.dtype)


def reference_image(image: str | Path | Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An image (file or PIL) -> `[3, H, W]` float in [-1, 1] at `size = (height, width)`, as released.

    diffusers' `load_image` applies the EXIF orientation (a phone photo tagged "rotate 90" stands
    upright) and converts to RGB; the centre crop to the target's aspect has integer sides
    (`aspect_crop_box`), then `VideoProcessor.preprocess` resizes with Lanczos and normalises.
    """
    from diffusers.utils import load_image  # diffusers is half a second of every train.py's start
    from diffusers.video_processor import VideoProcessor

    height, width = size
    image = load_image(str(image) if isinstance(image, Path) else image)
    image = image.crop(aspect_crop_box(image.width, image.height, height, width))
    return VideoProcessor(vae_scale_factor=16).preprocess(image, height=height, width=width)[0]


def aspect_crop_box(w: int, h: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """The release's centre crop of a `w` x `h` image to the aspect of `tw` x `th`: the kept side
    whole, the other `int()`-truncated, the box's float corners rounded (half to even) as PIL does."""
    if (w, h) == (tw, th):
        return 0, 0, w, h
    if h / w > th / tw:
        new_w, new_h = w, int(w * th / tw)
    else:
        new_w, new_h = int(h * tw / th), h
    corners = ((w - new_w) / 2, (h - new_h) / 2, (w + new_w) / 2, (h + new_h) / 2)
    return tuple(round(c) for c in corners)


def nearest_frames(src_times: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the source frame nearest in time for each of `times` (seconds, same origin as the
    sorted presentation times `src_times`); a tie goes to the later frame. Times, not the average
    rate, pick the frames: in a variable-frame-rate clip (10 fps, then 50 fps) frame k of the
    average rate is not the frame shown at time k / rate."""
    src_times, times = np.asarray(src_times, dtype=np.float64), np.asarray(times, dtype=np.float64)
    if src_times.ndim != 1 or src_times.size == 0:
        raise ValueError(
            f"nearest_frames: need the times of at least one source frame, got {src_times.shape}"
        )
    if src_times.size == 1:
        return np.zeros(times.shape, np.int64)
    after = np.clip(np.searchsorted(src_times, times, side="right"), 1, src_times.size - 1)
    before = after - 1
    # 1e-9: times that tie up to float error (pts x time_base vs i / fps) still go to the later frame
    later = src_times[after] - times <= times - src_times[before] + 1e-9
    return np.where(later, after, before)


def to_pixels(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (what the raw loader yields) -> float in [-1, 1] (what the video VAE takes)."""
    if video.dtype == torch.uint8:
        return video.float().div_(127.5).sub_(1.0)
    return video


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """`[3, F, H, W]` float in [-1, 1] (codec output) -> `[F, H, W, 3]` uint8 (what writers take)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video_to_uint8 expects [3, F, H, W], got {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic")


def upsample_frames(frames: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """`[F, H, W, 3]` uint8 -> `[F, height, width, 3]` uint8, as the release's `upsample_video`:
    each frame interpolated in [0, 1] (align_corners False), then `* 255` truncated to uint8."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    x = frames.permute(0, 3, 1, 2).float() / 255
    align = False if mode in ("bilinear", "bicubic") else None
    x = F.interpolate(x, size=size, mode=mode, align_corners=align)
    return (x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def write_mp4(
    path: str | Path,
    video: torch.Tensor,
    fps: float = 25.0,
    audio: torch.Tensor | None = None,
    sample_rate: int = 44100,
) -> None:
    """Write an H.264 (yuv420p) mp4, with an AAC track when `audio` `[channels, samples]` is given.

    `video` is `[F, H, W, 3]` uint8, or `[3, F, H, W]` float in [-1, 1] as the video codec returns.
    """
    if video.is_floating_point():
        video = video_to_uint8(video)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"write_mp4 expects video [F, H, W, 3] uint8 or [3, F, H, W] float, "
            f"got {tuple(video.shape)} {video.dtype}"
        )
    num_frames, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_mp4: yuv420p needs even height and width, got {height}x{width}")
    if audio is not None and (audio.ndim != 2 or audio.shape[0] not in (1, 2)):
        raise ValueError(f"write_mp4 expects audio [channels (1 or 2), samples], got {tuple(audio.shape)}")

    with av.open(str(path), mode="w", format="mp4") as container:
        vstream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        # x264's macroblock-tree rate control gives the same frames different bytes from run to run
        # (seen at 320x128, even on one thread); without it (~15% larger at crf 18) they repeat
        vstream.options = {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for frame in video.cpu().numpy():
            container.mux(vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(vstream.encode())
        if astream is not None:
            _mux_audio(container, astream, audio, sample_rate)


def _mux_audio(container, stream, audio: torch.Tensor, sample_rate: int) -> None:
    """Feed the AAC encoder in 1024-sample planar float frames (its native frame size)."""
    samples = np.ascontiguousarray(audio.detach().float().clamp(-1, 1).cpu().numpy())
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(samples[:, start : start + chunk], format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def read_audio(data: bytes, in_video: bool, start: float, length: int, rate: int) -> tuple[torch.Tensor, int]:
    """Decode with PyAV and resample with FFmpeg (libswresample) to mono at `rate`; place the samples
    by their timestamps: ([1, length] float, samples of it the track covered). The time origin is
    the video stream's first frame when the audio is the mp4's own track (so a track that starts
    late, by its start offset or edit list, lands where it plays), else the file's start."""
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        origin = 0.0
        if in_video and container.streams.video:
            video = container.streams.video[0]
            origin = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
        begin, end = origin + start, origin + start + length / rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks, first_time = [], None
        for frame in container.decode(stream):
            if frame.time is None or frame.time + frame.samples / frame.sample_rate < begin - 0.05:
                continue  # wholly before the window (the margin feeds the resampler's filter)
            if frame.time > end + 0.05:
                break
            if first_time is None:
                first_time = frame.time
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        if first_time is None:
            return torch.zeros(1, length), 0
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    decoded = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
    offset = round((begin - first_time) * rate)  # window start in the decoded samples
    lo, hi = max(0, -offset), max(0, min(length, decoded.shape[0] - offset))
    wave = torch.zeros(1, length)
    if hi > lo:
        wave[0, lo:hi] = decoded[offset + lo : offset + hi]
    return wave, max(0, hi - lo)
