"""make_shards.py inputs: folders with unusable clips, CSV/JSONL manifests, re-runs that resume."""

import json

import pytest
from test_data_raw import ROOT, tool

from magitrain.data.shards import iter_tar
from magitrain.data.synthetic import make_demo_dataset


def test_unreadable_clips_are_reported_and_skipped_and_reruns_resume(tmp_path, capsys):
    clips = tmp_path / "clips"
    make_demo_dataset(clips, num_clips=3, seconds=1.0, size=(64, 128))
    (clips / "broken.mp4").write_bytes(b"\x00" * 1000)
    (clips / "broken.json").write_text('{"caption": "never decoded"}')
    (clips / "clip_0002.json").unlink()  # no caption left for this clip
    out = tmp_path / "shards"
    tool("make_shards.py", str(clips), str(out), "--max-count", "1", "--workers", "2")
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "clip_0002.mp4" in err and "no caption" in err
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]

    (out / "000001.tar").unlink()  # as if the first run died while writing shard 1
    first = (out / "000000.tar").stat().st_mtime_ns
    tool("make_shards.py", str(clips), str(out), "--max-count", "1", "--workers", "2")
    assert "(1 already done)" in capsys.readouterr().out
    assert (out / "000001.tar").exists() and (out / "000000.tar").stat().st_mtime_ns == first

    make_demo_dataset(clips, num_clips=4, seconds=1.0, size=(64, 128))  # the input changed
    with pytest.raises(SystemExit, match="other input"):
        tool("make_shards.py", str(clips), str(out), "--max-count", "1", "--workers", "2")


def test_csv_and_jsonl_manifests(tmp_path):
    media = tmp_path / "media"
    make_demo_dataset(media, num_clips=2, seconds=1.0, size=(64, 128), separate_wav=True)
    (tmp_path / "list.csv").write_text(
        "path,caption,language,audio,speaker\n"
        "media/clip_0000.mp4,first clip,de,media/clip_0000.wav,ann\n"
        "media/clip_0001.mp4,second clip,fr,,bob\n"
    )
    tool("make_shards.py", str(tmp_path / "list.csv"), str(tmp_path / "csv"), "--workers", "1")
    index = json.loads((tmp_path / "csv" / "000000.index.json").read_text())
    assert [(r["language"], r["has_audio"]) for r in index["samples"]] == [("de", True), ("fr", False)]

    rows = [{"path": str(media / "clip_0001.mp4"), "caption": "from jsonl", "language": "es"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tool("make_shards.py", str(tmp_path / "list.jsonl"), str(tmp_path / "jsonl"), "--workers", "1")
    (sample,) = list(iter_tar(str(tmp_path / "jsonl" / "000000.tar")))
    meta = json.loads(sample["json"])
    assert meta["caption"] == "from jsonl" and meta["source"].endswith("clip_0001.mp4")
    assert "wav" not in sample


def test_manifest_aliases_and_unknown_columns(tmp_path, capsys):
    media = tmp_path / "media"
    make_demo_dataset(media, num_clips=1, seconds=1.0, size=(64, 128), separate_wav=True)
    (tmp_path / "list.csv").write_text(
        "video_path,text,audio_path,speaker,mood\n"
        "media/clip_0000.mp4,an aliased row,media/clip_0000.wav,ann,calm\n"
    )
    tool("make_shards.py", str(tmp_path / "list.csv"), str(tmp_path / "out"), "--workers", "1")
    assert "['mood'] are not among" in capsys.readouterr().err  # reported, kept as metadata
    (sample,) = list(iter_tar(str(tmp_path / "out" / "000000.tar")))
    meta = json.loads(sample["json"])
    assert meta["caption"] == "an aliased row" and meta["mood"] == "calm" and "wav" in sample
    # a speaker id (data.voice_reference.source=same_speaker) is kept in KEY.json and the index row
    index = json.loads((tmp_path / "out" / "000000.index.json").read_text())
    assert meta["speaker"] == index["samples"][0]["speaker"] == "ann"
    assert meta["audio_duration"] == pytest.approx(1.0, abs=0.01)  # the separate wav was probed
    (tmp_path / "both.csv").write_text("path,video_path,caption\na.mp4,b.mp4,c\n")
    with pytest.raises(SystemExit, match="'path' and 'video_path' both give 'path'"):
        tool("make_shards.py", str(tmp_path / "both.csv"), str(tmp_path / "out2"), "--workers", "1")


def test_nothing_written_is_a_failure(tmp_path):
    import subprocess
    import sys

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "broken.mp4").write_bytes(b"\x00" * 100)
    (clips / "broken.json").write_text('{"caption": "never decoded"}')
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "make_shards.py"), str(clips), str(tmp_path / "out"),
         "--workers", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "broken.mp4" in result.stderr and "nothing to write" in result.stderr
    assert not list((tmp_path / "out").glob("*.tar"))
