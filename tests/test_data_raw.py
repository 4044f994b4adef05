"""Round trip on real media: synthetic mp4s -> make_shards -> inspect_shards -> raw DataModule."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from safetensors.torch import load

from magitrain.codecs.media import to_pixels
from magitrain.data.buckets import Bucket
from magitrain.data.datamodule import MagiDataModule
from magitrain.data.decode import RawOptions, decode_raw
from magitrain.data.encode import resize_video
from magitrain.data.index import read_index
from magitrain.data.shards import index_url, iter_tar
from magitrain.data.synthetic import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [
    {"height": 64, "width": 128, "seconds": 1, "batch_size": 2},
    {"height": 64, "width": 128, "seconds": 2, "batch_size": 2},
]


def tool(name: str, *args: str):
    """Run a data tool's main() in this process (a fresh interpreter costs seconds of imports); it is
    registered in sys.modules so its multiprocessing workers can unpickle its functions."""
    return load_script(ROOT / "data_tools" / name).main(list(args))


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    clips = tmp_path_factory.mktemp("clips")
    # 1.2-2.4 s clips (two duration buckets), every other one with its audio in a separate wav
    make_demo_dataset(clips / "a", num_clips=4, seconds=(1.2, 2.4), size=(64, 128), seed=1)
    make_demo_dataset(
        clips / "b",
        num_clips=3,
        seconds=(1.2, 2.4),
        size=(72, 120),
        separate_wav=True,
        reference_image=True,
        seed=2,
    )
    out = tmp_path_factory.mktemp("shards")
    tool("make_shards.py", str(clips), str(out), "--max-count", "3", "--workers", "2")
    return out


def test_make_shards_then_inspect(raw_shards, capsys):
    assert sorted(p.name for p in raw_shards.iterdir()) == [
        f"00000{i}.{ext}" for i in range(3) for ext in ("index.json", "tar")
    ] + ["make_shards.plan.json"]
    capsys.readouterr()
    assert tool("inspect_shards.py", str(raw_shards / "*.tar"), "--validate", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == []
    summary = report["summary"]
    assert summary["samples"] == 7 and summary["shards"] == 3 and summary["kind"] == ["raw"]
    assert summary["resolution"] == {"128x64": 4, "120x72": 3} and summary["has_audio"] == {"True": 7}
    index = json.loads((raw_shards / "000000.index.json").read_text())
    row = index["samples"][0]
    assert row["key"] == "0000000" and row["width"] == 128 and 1.2 <= row["duration"] <= 2.4


def test_raw_batches_are_pixels_and_waveforms_cut_to_buckets(raw_shards):
    dm = MagiDataModule(
        mode="raw",
        shards=str(raw_shards / "{000000..000002}.tar"),
        buckets=BUCKETS,
        num_workers=2,
        shuffle_buffer=2,
    )
    keys, frames, refs = Counter(), Counter(), 0
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        video, audio = batch["video"], batch["audio"]
        size, channels, f, h, w = video.shape
        assert (channels, h, w) == (3, 64, 128) and f in (25, 49)
        assert video.dtype == torch.uint8 and video.min() < 64 and video.max() > 192
        assert batch["sample_rate"] == 51200 and audio.shape == (size, 2, f * 2048)  # F/25 s
        assert batch["audio_mask"].tolist() == [True] * size
        assert torch.equal(audio[:, 0], audio[:, 1]) and audio.abs().amax(dim=-1).min() > 0.05
        assert all(isinstance(c, str) and c for c in batch["caption"])
        keys.update(batch["key"])
        frames[f] += size
        if "ref_image" in batch:  # only the "b" clips carry a KEY.jpg
            assert batch["ref_image"].shape == (size, 3, 64, 128) and batch["ref_image"].dtype == torch.uint8
            refs += size
    assert len(keys) == 7 and set(keys.values()) == {1}
    assert sum(frames.values()) == 7 and dm.quality.bad == 0 and refs <= 3


def test_encode_shards_to_latent_shards_with_sr_pairs(raw_shards, tmp_path, monkeypatch, capsys):
    # rank 1 of 2 takes the second of the two input shards: 000001.tar holds one 64x128 clip with
    # its audio in the mp4 and two 72x120 clips with a wav and a KEY.jpg (encoded as one batch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [str(raw_shards / "{000002,000001}.tar"), str(tmp_path), "codecs=tiny", "--bucket", "32x32:0.16",
            "--sr", "64x64", "--dtype", "float32", "--batch-size", "2"]  # fmt: skip
    tool("encode_shards.py", *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001.index.json", "000001.tar"]
    tool("encode_shards.py", *args)
    assert "1 already encoded" in capsys.readouterr().out

    with_reference = {s["__key__"]: "ref_latent" in load(s["latents.safetensors"])
                      for s in iter_tar(str(tmp_path / "000001.tar"))}  # fmt: skip
    assert with_reference == {"0000010": False, "0000011": True, "0000012": True}
    dm = MagiDataModule(mode="latent", shards=str(tmp_path / "000001.tar"), num_workers=0, shuffle=False,
                        buckets=[{"height": 64, "width": 64, "frames": 5, "batch_size": 2}])  # fmt: skip
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    # the two clips with a reference image filled a batch first; the other one was flushed at the end
    assert [b["key"] for b in batches] == [["0000011", "0000012"], ["0000010"]]
    for batch in batches:
        size = len(batch["key"])
        assert batch["video_latent"].shape == (size, 48, 2, 4, 4) and batch["audio_latent"].shape == (
            size,
            5,
            64,
        )
        assert batch["lr_video_latent"].shape == (size, 48, 2, 2, 2)
        assert (
            batch["text_emb"].shape[-1] == 64 and int(batch["text_len"].max()) == batch["text_emb"].shape[1]
        )
    assert batches[0]["ref_latent"].shape == (2, 48, 1, 2, 2)  # from KEY.jpg, at the base bucket size
    assert "ref_latent" not in batches[1] and batches[1]["caption"][0].startswith("A ")

    # one clip, same frames: the HR latent is the tiny codecs' encoding of the clip cut at the SR
    # size as the raw loader cuts it, and the LR latent that of the same pixels resized to the bucket
    codecs = sys.modules["encode_shards"].load_codecs(["codecs=tiny"], "cpu")
    url = str(raw_shards / "000001.tar")
    rows = {row["key"]: row for row in read_index(url, index_url(url)).rows}
    raw = {s["__key__"]: s for s in iter_tar(url)}
    for sample in iter_tar(str(tmp_path / "000001.tar")):
        key, latents = sample["__key__"], load(sample["latents.safetensors"])
        hr = decode_raw(raw[key], rows[key], Bucket(64, 64, 5, 1), RawOptions(), random.Random(0))["video"]
        with torch.no_grad():
            want_hr = codecs.video.encode(to_pixels(hr[None]))[0]
            want_lr = codecs.video.encode(to_pixels(resize_video(hr[None], (32, 32))))[0]
        torch.testing.assert_close(latents["video_latent"], want_hr, atol=1e-4, rtol=1e-4, msg=key)
        torch.testing.assert_close(latents["lr_video_latent"], want_lr, atol=1e-4, rtol=1e-4, msg=key)


def test_cli_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "inspect_shards.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "--validate" in result.stdout


def test_video2dataset_style_shard_without_index(raw_shards, tmp_path):
    """KEY.mp4 + KEY.txt caption + KEY.json of other metadata, no sidecar index: the loader scans the
    tar, and inspect_shards --write-index saves what it found."""
    from magitrain.data.shards import iter_tar
    from magitrain.data.writer import write_shard

    samples = []
    for i, sample in enumerate(iter_tar(str(raw_shards / "000000.tar"))):
        members = {
            "__key__": f"{i:09d}",
            "mp4": sample["mp4"],
            "txt": b"a caption from KEY.txt",
            "json": json.dumps({"url": "http://x", "status": "success"}).encode(),
        }
        samples.append((members, {}))
    tar = write_shard(tmp_path, 0, "raw", samples)
    tar.with_suffix(".index.json").unlink()
    dm = MagiDataModule(mode="raw", shards=str(tar), buckets=BUCKETS, num_workers=0)
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert sorted(k for b in batches for k in b["key"]) == [f"{i:09d}" for i in range(3)]
    assert {c for b in batches for c in b["caption"]} == {"a caption from KEY.txt"}
    assert tool("inspect_shards.py", str(tar), "--write-index", "--json") == 0
    assert json.loads(tar.with_suffix(".index.json").read_text())["num_samples"] == 3


@pytest.mark.parametrize(
    ("source", "bucket"),
    [((320, 180), (48, 48)), ((200, 200), (48, 48)), ((320, 180), (64, 48)), ((180, 320), (48, 48)),
     ((180, 320), (32, 64))],
)  # fmt: skip
def test_decoder_scaling_never_turns_a_good_clip_corrupt(tmp_path, source, bucket):
    """(height, width) pairs at which decord's scaled decode fails ("from_size == to_size"): the
    loader decodes at native size and resizes itself; the frames match that path's result."""
    import random

    from magitrain.codecs.media import resize_cover_crop
    from magitrain.data.buckets import Bucket
    from magitrain.data.decode import RawOptions, decode_raw
    from magitrain.data.index import probe_media
    from magitrain.data.synthetic import make_clip

    make_clip(tmp_path / "clip.mp4", seconds=0.6, size=source, audio="tone", seed=3)
    sample = {"__key__": "k", "mp4": (tmp_path / "clip.mp4").read_bytes(), "json": b'{"caption": "c"}'}
    b = Bucket(*bucket, 9, 1)
    out = decode_raw(sample, probe_media(sample["mp4"]), b, RawOptions(), random.Random(0))
    assert out["video"].shape == (3, 9, *bucket) and out["audio"].shape == (2, 9 * 2048)
    import decord

    native = decord.VideoReader(str(tmp_path / "clip.mp4")).get_batch(list(range(9))).asnumpy()
    expected = resize_cover_crop(torch.from_numpy(native).permute(0, 3, 1, 2), bucket).permute(1, 0, 2, 3)
    assert (out["video"].float() - expected.float()).abs().mean() < 6  # of 255: scaler vs ours


VFR_TIMES = np.concatenate([np.arange(10) / 10, 1 + np.arange(50) / 50])  # 10 fps, then 50 fps


def write_vfr_clip(path: Path, size: int = 64, rate: int = 48000) -> None:
    """2 s: 1 s at 10 fps, then 1 s at 50 fps (VFR_TIMES, pts set per frame, 1 ms time base). Each
    frame's grey level is 20 + 100 x its time in s; the mono AAC track is a 440 Hz tone whose
    amplitude is 0.1 + 0.2 x the time, so both tracks show their own time."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=50)
        video.width = video.height = size
        video.pix_fmt, video.time_base = "yuv420p", Fraction(1, 1000)
        video.codec_context.time_base = Fraction(1, 1000)
        video.options = {"crf": "0", "preset": "veryfast"}  # lossless: the grey levels survive
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for t in VFR_TIMES:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 + round(100 * t), np.uint8))
            frame.pts, frame.time_base = round(float(t) * 1000), Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        t = np.arange(2 * rate) / rate
        wave = ((0.1 + 0.2 * t) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for start in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(wave[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())


def test_variable_frame_rate_clip_stays_in_sync(tmp_path):
    """Frames were picked by index at the average rate (30 fps here) while the audio is cut by time:
    at 0.5 s the loader showed the frame of 1.1 s. Each frame of the cut must be the source frame
    nearest its 25 fps time, and show the time its audio slice does."""
    from magitrain.data.index import probe_media

    write_vfr_clip(tmp_path / "vfr.mp4")
    sample = {"__key__": "vfr", "mp4": (tmp_path / "vfr.mp4").read_bytes(), "json": b'{"caption": "c"}'}
    row = probe_media(sample["mp4"])
    assert abs(row["duration"] - 2.0) < 0.03 and 20 < row["fps"] < 40, row  # an average rate
    bucket = Bucket(64, 64, 45, 1)
    opts = RawOptions(sample_rate=51200, channels=1, random_offset=True)
    for seed in range(3):  # random starts within the 2 s span
        out = decode_raw(sample, row, bucket, opts, random.Random(seed))
        shown = (out["video"].float().mean(dim=(0, 2, 3)).numpy() - 20) / 100  # each frame's time
        slices = out["audio"][0].reshape(bucket.frames, -1).numpy()  # the 1/25 s of each frame
        heard = (np.sqrt(2 * (slices**2).mean(axis=1)) - 0.1) / 0.2  # the time in its middle
        # where the audio cut starts (FFmpeg's AAC encoder leaves a loud blip or two: the median)
        start = float(np.median(heard - 0.02 - np.arange(bucket.frames) / 25))
        assert abs(start - round(start * 25) / 25) < 0.015, start  # on the 25 fps grid
        times = round(start * 25) / 25 + np.arange(bucket.frames) / 25
        want = VFR_TIMES[np.abs(VFR_TIMES[None] - times[:, None]).argmin(axis=1)]  # the nearest frames
        assert np.abs(shown - want).max() < 0.025, (seed, start, np.round(shown - want, 2))
