"""Corrupt, truncated and incomplete input is skipped and counted per reason; good samples still arrive."""

import io
import json
import tarfile
from collections import Counter

import pytest
from test_data_raw import tool

from magitrain.data.datamodule import MagiDataModule
from magitrain.data.quality import BadDataError
from magitrain.data.synthetic import make_clip
from magitrain.data.writer import write_shard

BUCKETS = [{"height": 64, "width": 128, "seconds": 1, "batch_size": 2}]
ROW = {"duration": 1.2, "width": 128, "height": 64, "fps": 25.0, "has_audio": True, "language": "en"}


def members(key: str, mp4: bytes, meta: bytes | None = None) -> dict:
    return {"__key__": key, "mp4": mp4, "json": meta or json.dumps({"caption": f"clip {key}"}).encode()}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Shard 0: 4 good clips, a random-bytes mp4, a truncated mp4, a clip without audio, a bad json.
    Shard 1: 5 good clips, the tar cut inside sample 3 (samples 3 and 4 are lost)."""
    out = tmp_path_factory.mktemp("bad")
    clips = []
    for i in range(10):
        make_clip(out / "clip.mp4", seconds=1.2, size=(64, 128), audio=None if i == 9 else "tone", seed=i)
        clips.append((out / "clip.mp4").read_bytes())
    (out / "clip.mp4").unlink()
    shard0 = [members(f"good{i}", clips[i]) for i in range(4)] + [
        members("corrupt", bytes(range(256)) * 40),
        members("truncated", clips[4][: len(clips[4]) // 2]),
        members("noaudio", clips[9]),
        members("badjson", clips[5], b"{not json"),
    ]
    write_shard(out, 0, "raw", [(m, {**ROW, "has_audio": m["__key__"] != "noaudio"}) for m in shard0])
    tar = write_shard(out, 1, "raw", [(members(f"tail{i}", clips[5 + i % 4]), ROW) for i in range(5)])
    with tarfile.open(tar) as f:
        cut = next(m.offset for m in f.getmembers() if m.name.startswith("tail3")) + 700
    tar.write_bytes(tar.read_bytes()[:cut])
    return str(out / "{000000..000001}.tar")


def run(shards, **kw) -> tuple[Counter, MagiDataModule]:
    dm = MagiDataModule(mode="raw", shards=shards, buckets=BUCKETS, num_workers=2, shuffle_buffer=3, **kw)
    keys = Counter()
    for batch in dm.train_dataloader():
        keys.update(dm.on_before_batch_transfer(batch, 0)["key"])
    return keys, dm


def test_bad_samples_are_skipped_and_counted(bad_shards):
    keys, dm = run(bad_shards, max_bad_fraction=1.0)
    good = {f"good{i}" for i in range(4)} | {f"tail{i}" for i in range(3)} | {"noaudio"}
    assert set(keys) == good  # missing_audio=mask keeps the clip, its audio loss masked
    assert dm.quality.counts == {"corrupt_video": 2, "bad_json": 1, "truncated_tar": 2}
    assert dm.quality.notes == {"audio_masked": 1}
    assert dm.quality.seen == 13
    assert "corrupt" in dm.quality.summary() and "tail3" in dm.quality.summary()


def test_missing_audio_drop_policy(bad_shards):
    keys, dm = run(bad_shards, max_bad_fraction=1.0, missing_audio="drop")
    assert "noaudio" not in keys and "missing_audio" not in dm.quality.counts
    assert dm.dataset.unplanned == {"missing_audio": 1}  # left out of the plan, counted with its reason
    assert "missing_audio: 1" in dm.quality.summary() and "noaudio" in dm.quality.summary()


def test_too_many_bad_samples_stop_the_run(bad_shards):
    with pytest.raises(BadDataError, match=r"data.max_bad_fraction=0.1.*corrupt_video"):
        run(bad_shards, max_bad_fraction=0.1, bad_check_after=4)


def test_validate_lists_every_bad_sample(bad_shards, capsys):
    assert tool("inspect_shards.py", bad_shards, "--validate", "--json") == 1
    bad = {(url[-10:], key): reason for url, key, reason in json.loads(capsys.readouterr().out)["bad"]}
    assert {k for k, _ in bad} == {"000000.tar", "000001.tar"}
    reasons = Counter(reason.split(":")[0] for reason in bad.values())
    assert reasons == {"corrupt_video": 2, "bad_json": 1, "truncated_tar": 1, "missing_in_tar": 2}


def test_oversized_images_and_videos_are_bad_samples_not_decoded(tmp_path):
    """Image bombs: a 12000x12000 KEY.jpg (1.7 MB, one grey) was decoded whole, 2.2 GB on its way to
    the bucket, and a worker killed for memory ends the run. Sizes are read from the headers (the
    JPEG's, and the mp4's as its index row recorded it): above data.max_pixels the sample is
    counted as bad (too_large) and the others still arrive."""
    from PIL import Image

    from magitrain.data.buckets import Bucket
    from magitrain.data.decode import BadSample, RawOptions, decode_image
    from magitrain.data.index import probe_media

    bomb = io.BytesIO()
    Image.new("L", (12000, 12000), 128).save(bomb, "JPEG", quality=50)
    with pytest.raises(BadSample, match=r"too_large: KEY.jpg is 12000x12000 > data.max_pixels=33177600"):
        decode_image(bomb.getvalue(), Bucket(64, 128, 25, 1), RawOptions().max_pixels)  # the default
    samples = []
    for i, size in enumerate([(64, 128), (64, 128), (128, 256), (64, 128)]):
        make_clip(tmp_path / "clip.mp4", seconds=1.2, size=size, audio="tone", seed=i)
        sample = members(f"clip{i}", (tmp_path / "clip.mp4").read_bytes())
        if i == 1:
            sample["jpg"] = bomb.getvalue()
        samples.append((sample, {**probe_media(sample["mp4"]), "language": "en"}))
    write_shard(tmp_path, 0, "raw", samples)
    keys, dm = run(str(tmp_path / "000000.tar"), max_bad_fraction=1.0, max_pixels=128 * 256 - 1)
    assert set(keys) == {"clip0", "clip3"}
    assert dm.quality.counts == {"too_large": 2}
    assert "12000x12000 > data.max_pixels" in dm.quality.summary()
    assert "256x128 > data.max_pixels" in dm.quality.summary()
