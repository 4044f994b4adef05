"""Media helpers: cover-resize + centre crop, 25 fps resampling, mp4 (H.264 + AAC) written with PyAV
and read back with decord."""

import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image

from magitrain.codecs.media import (
    aspect_crop_box,
    nearest_frames,
    reference_image,
    resize_cover_crop,
    video_to_uint8,
    write_mp4,
)


def test_resize_cover_crop_is_a_centre_crop_when_no_scaling_is_needed():
    frames = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    out = resize_cover_crop(frames, (64, 48))
    assert out.dtype == torch.uint8
    assert torch.equal(out, frames[..., 24:72])


def test_resize_cover_crop_keeps_aspect_and_covers():
    # 4:3 landscape with a left-black / right-white split -> square target: the image is scaled by
    # target_h / h (covers the height), so the split must still sit in the middle of the crop.
    frames = torch.zeros(1, 3, 120, 160)
    frames[..., 80:] = 1.0
    out = resize_cover_crop(frames, (48, 48))
    assert out.shape == (1, 3, 48, 48) and out.dtype == torch.float32
    assert out[..., :20].max() < 0.05 and out[..., 28:].min() > 0.95
    # portrait target from landscape: upscales to cover the height, crops the width
    tall = resize_cover_crop(frames, (256, 64))
    assert tall.shape == (1, 3, 256, 64)
    assert torch.allclose(tall[..., :30], torch.zeros(()), atol=1e-4)  # centre crop lies in the left half


def test_resize_cover_crop_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        resize_cover_crop(torch.zeros(3, 64, 64), (32, 32))


def test_nearest_frames_by_presentation_time():
    out = np.arange(10) / 25.0  # 25 fps output times
    assert nearest_frames(np.arange(10) / 25.0, out).tolist() == list(range(10))
    assert nearest_frames(np.arange(20) / 50.0, out).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    idx = nearest_frames(np.arange(150) / 30.0, np.arange(125) / 25.0)  # 5 s at 30 fps
    assert idx[:6].tolist() == [0, 1, 2, 4, 5, 6] and idx[-1] == 149  # 124 * 1.2 = 148.8
    # 1 s at 10 fps, then 50 fps: the frame shown at each time, not index k of the 30 fps average
    vfr = np.concatenate([np.arange(10) / 10.0, 1.0 + np.arange(50) / 50.0])
    assert nearest_frames(vfr, np.array([0.44, 0.5, 1.0, 1.5])).tolist() == [4, 5, 10, 35]
    assert nearest_frames(np.array([0.0]), out).tolist() == [0] * 10


def test_video_to_uint8():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 4, 1, 1).expand(3, 4, 2, 2)
    out = video_to_uint8(video)
    assert out.shape == (4, 2, 2, 3) and out.dtype == torch.uint8
    assert out[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


def test_write_mp4_reads_back_with_decord(tmp_path):
    frames, height, width, rate = 26, 64, 96, 44100
    # a flat colour per frame: survives H.264 within a few levels, so decoded colours are checkable
    level = torch.linspace(-0.8, 0.8, frames)
    video = level.view(1, frames, 1, 1).expand(3, frames, height, width).clone()
    video[1] = 0.0
    seconds = (frames - 1) / 25
    t = torch.arange(round(seconds * rate)) / rate
    audio = torch.stack([0.5 * torch.sin(2 * torch.pi * 440 * t), 0.5 * torch.sin(2 * torch.pi * 1000 * t)])
    path = tmp_path / "clip.mp4"
    write_mp4(path, video, fps=25, audio=audio, sample_rate=rate)

    reader = decord.VideoReader(str(path))
    assert len(reader) == frames and reader.get_avg_fps() == pytest.approx(25.0)
    decoded = reader.get_batch(list(range(frames))).asnumpy()
    assert decoded.shape == (frames, height, width, 3)
    expected = video_to_uint8(video)[:, 0, 0, 0].numpy().astype(float)
    assert np.abs(decoded[:, height // 2, width // 2, 0] - expected).max() < 6

    # decord's stereo read is unreliable (NaN / swapped channels), so: duration and content from
    # decord's mono mix, channel separation from PyAV's (FFmpeg's) AAC decoder.
    sound = decord.AudioReader(str(path), sample_rate=rate, mono=True)
    assert sound.duration() == pytest.approx(seconds, abs=0.05)  # AAC adds < 50 ms of codec delay
    assert set(_peaks(sound[:].asnumpy()[0], rate, 2)) == {440, 1000}
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        wave = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
    assert wave.shape[0] == 2
    assert _peaks(wave[0], rate, 1) == [440] and _peaks(wave[1], rate, 1) == [1000]


def _peaks(wave: np.ndarray, rate: int, count: int) -> list[int]:
    """The `count` strongest frequencies, rounded to 10 Hz."""
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(wave.shape[-1], 1 / rate)
    found = []
    for i in np.argsort(spectrum)[::-1]:
        f = int(round(freqs[i], -1))
        if f not in found:
            found.append(f)
        if len(found) == count:
            return found
    return found


def test_write_mp4_uint8_without_audio(tmp_path):
    video = torch.randint(0, 256, (5, 32, 48, 3), dtype=torch.uint8)
    path = tmp_path / "silent.mp4"
    write_mp4(path, video, fps=24)
    reader = decord.VideoReader(str(path))
    assert len(reader) == 5 and reader.get_avg_fps() == pytest.approx(24.0)
    with pytest.raises(decord.DECORDError):
        decord.AudioReader(str(path))


def test_write_mp4_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(2, 33, 48, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[channels"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(2, 32, 48, 3, dtype=torch.uint8), audio=torch.zeros(100))


def _odd_image(width: int = 101, height: int = 77) -> Image.Image:
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_reference_image_crops_and_resizes_as_the_release():
    """The release's arithmetic on an odd-sized image: a 101x77 image for a 96x64 target keeps its
    width and crops int(101 * 64 / 96) = 67 rows from row 5, then Lanczos to 96x64, then [-1, 1].
    Caught: the earlier cover-resize (ceil, bilinear) then crop (PSNR 27-30 dB against this)."""
    image = _odd_image()
    assert aspect_crop_box(101, 77, 64, 96) == (0, 5, 101, 72)
    assert aspect_crop_box(77, 101, 64, 96) == (0, 25, 77, 76)  # portrait source: 51 of 101 rows
    assert aspect_crop_box(101, 77, 96, 64) == (25, 0, 76, 77)  # 51.33 -> 51 columns, box rounded
    expected = np.asarray(image.crop((0, 5, 101, 72)).resize((96, 64), Image.LANCZOS), dtype=np.float32)
    expected = torch.from_numpy(expected / 255 * 2 - 1).permute(2, 0, 1)
    out = reference_image(image, (64, 96))
    assert out.shape == (3, 64, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_reference_image_applies_the_exif_orientation(tmp_path):
    """A photo stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view") conditions on
    the upright picture, as the release's diffusers `load_image` does. Caught: Image.open + convert
    ignored the tag and fed the sideways image."""
    stored = _odd_image(60, 40)
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows: 40 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    out = reference_image(tmp_path / "phone.png", (64, 32))
    torch.testing.assert_close(out, reference_image(tmp_path / "upright.png", (64, 32)), atol=0, rtol=0)
    assert not torch.allclose(out, reference_image(stored, (64, 32)))
