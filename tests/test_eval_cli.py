"""`python -m magitrain.eval` end to end on real mp4s: the JSON's keys, per-clip errors and the exit
status, the markdown report and its thumbnails, compare mode, the prompts file pairing with
infer.py's outputs, and the bootstrap aggregates."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_sync import frame_levels, mouth_clip, shifted

from magitrain.codecs.media import write_mp4
from magitrain.data.synthetic import speak
from magitrain.errors import UserError
from magitrain.eval.__main__ import main, parse
from magitrain.eval.references import pair
from magitrain.eval.stats import bootstrap, paired_deltas
from magitrain.prompt_file import read_prompt_rows

REPO = Path(__file__).resolve().parents[1]
WEIGHT_FREE = {
    "av_offset_frames",
    "av_confidence",
    "loudness_lufs",
    "clipping_ratio",
    "silence_ratio",
    "flicker",
    "frozen_ratio",
    "duration_mismatch_s",
}
FPS = 25


@pytest.fixture(scope="module")
def speech():
    audio, rate = speak("Hello there, this is a short sentence about lip sync and timing.", "en")
    return audio[:, : round(2.0 * rate)], rate


def talking(path: Path, speech, offset: int = 0, seed: int = 0) -> None:
    """A drawn mouth that follows the speech, the audio `offset` frames late."""
    audio, rate = speech
    frames = mouth_clip(frame_levels(audio, rate, FPS, round(audio.shape[1] / rate * FPS)), seed=seed)
    shifted_audio = shifted(audio, offset, rate, FPS)
    write_mp4(path, torch.from_numpy(frames), FPS, torch.from_numpy(shifted_audio), rate)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, speech):
    """A folder with two talking clips (in sync; audio 4 frames late), one without an audio stream
    and one that is not a video; and a second folder, B, of the same talking clips with other
    offsets plus one clip A does not have."""
    a = tmp_path_factory.mktemp("a")
    talking(a / "clip_000.mp4", speech, 0)
    talking(a / "clip_001.mp4", speech, 4, seed=1)
    write_mp4(a / "no_audio.mp4", torch.zeros(10, 16, 16, 3, dtype=torch.uint8), FPS)
    (a / "broken.mp4").write_text("not a video\n")
    b = tmp_path_factory.mktemp("b")
    talking(b / "clip_000.mp4", speech, 6)
    talking(b / "clip_001.mp4", speech, 0, seed=1)
    talking(b / "extra.mp4", speech, 0, seed=2)
    return a, b


def test_cli_scores_a_folder(clips, tmp_path, script):
    """The JSON holds exactly the issue's keys: every readable clip the eight weight-free metrics,
    the two bad files only a named error; the offsets are found; the exit status is 1 (a clip
    failed); the report links a thumbnail strip per readable clip, which opens as a PNG."""
    a, _ = clips
    result = script(
        "-m",
        "magitrain.eval",
        str(a),
        f"json={tmp_path / 'out.json'}",
        f"report={tmp_path / 'report' / 'r.md'}",
    )
    assert result.returncode == 1, result.stderr
    assert "2 clip(s) failed" in result.stderr
    scores = json.loads((tmp_path / "out.json").read_text())
    assert set(scores) == {"clips", "aggregate"}
    rows = scores["clips"]
    assert set(rows) == {"clip_000.mp4", "clip_001.mp4", "no_audio.mp4", "broken.mp4"}
    assert set(rows["clip_000.mp4"]) == WEIGHT_FREE == set(rows["clip_001.mp4"])
    assert rows["clip_000.mp4"]["av_offset_frames"] == 0 and rows["clip_001.mp4"]["av_offset_frames"] == 4
    assert rows["no_audio.mp4"] == {"error": "no_audio.mp4: no audio stream"}
    assert set(rows["broken.mp4"]) == {"error"} and "broken.mp4: unreadable" in rows["broken.mp4"]["error"]
    assert set(scores["aggregate"]) == WEIGHT_FREE
    confidence = scores["aggregate"]["av_confidence"]
    assert set(confidence) == {"mean", "ci95", "n"} and confidence["n"] == 2
    report = (tmp_path / "report" / "r.md").read_text()
    assert "| clip_001.mp4 |" in report and "no audio stream" in report
    for name in ("clip_000", "clip_001"):
        assert f"](r_thumbs/{name}.png)" in report
        with Image.open(tmp_path / "report" / "r_thumbs" / f"{name}.png") as strip:
            assert strip.format == "PNG" and strip.size[1] == 96 and strip.size[0] > strip.size[1]


def test_cli_exit_status_and_command_errors(clips, tmp_path, capsys):
    """Good clips only: status 0 and the JSON on stdout. A mistyped key (did-you-mean, status 2 and
    one short line), a missing folder, a bad max_lag, a compare of one folder: errors naming them."""
    a, _ = clips
    assert main([str(a / "clip_000.mp4"), "eval.max_lag=12"]) == 0
    assert set(json.loads(capsys.readouterr().out)["clips"]["clip_000.mp4"]) == WEIGHT_FREE
    typo = subprocess.run(  # the command in a process of its own: its exit status
        [sys.executable, "-m", "magitrain.eval", str(a), "eval.max_lagg=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert typo.returncode == 2 and "unknown key 'eval.max_lagg' (did you mean eval.max_lag?)" in typo.stderr
    with pytest.raises(UserError, match="nowhere: no such file or folder"):
        main([str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="eval.max_lag=0"):
        parse([str(a), "eval.max_lag=0"])
    with pytest.raises(UserError, match="compare takes two folders"):
        parse(["compare", str(a)])


def test_missing_weights_are_a_per_clip_error(clips, tmp_path, capsys):
    """eval.asr_path pointing nowhere: each readable clip keeps its weight-free metrics and gets an
    error naming the key; status 1."""
    a, _ = clips
    code = main(
        [str(a / "clip_000.mp4"), f"eval.asr_path={tmp_path / 'no_whisper'}", f"json={tmp_path / 'o.json'}"]
    )
    row = json.loads((tmp_path / "o.json").read_text())["clips"]["clip_000.mp4"]
    assert code == 1
    assert WEIGHT_FREE <= set(row) and "eval.asr_path" in row["error"] and "no_whisper" in row["error"]


def test_compare(clips, tmp_path, capsys):
    """compare A B: the clips both have are paired by file name, each per-clip delta is B - A of the
    two sides' own scores, the deltas' CIs are over the pairs; clips of one side only are listed;
    the report shows both strips."""
    a, b = clips
    code = main(["compare", str(a), str(b), f"json={tmp_path / 'c.json'}", f"report={tmp_path / 'c.md'}"])
    assert code == 1  # A's two bad clips
    result = json.loads((tmp_path / "c.json").read_text())
    assert set(result) == {"a", "b", "clips", "delta", "unmatched"}
    assert result["unmatched"] == {"a_only": ["broken.mp4", "no_audio.mp4"], "b_only": ["extra.mp4"]}
    assert set(result["clips"]) == {"clip_000.mp4", "clip_001.mp4"}
    assert result["clips"]["clip_000.mp4"]["av_offset_frames"] == 6
    assert result["clips"]["clip_001.mp4"]["av_offset_frames"] == -4
    for name, deltas in result["clips"].items():
        for metric, delta in deltas.items():
            assert delta == pytest.approx(
                result["b"]["clips"][name][metric] - result["a"]["clips"][name][metric]
            )
    offset = result["delta"]["av_offset_frames"]
    assert offset["n"] == 2 and offset["mean"] == pytest.approx(1.0) and offset["ci95"] == [-4.0, 6.0]
    report = (tmp_path / "c.md").read_text()
    assert "Only in B: extra.mp4" in report
    for side in "AB":
        assert f"c_thumbs/clip_000_{side}.png" in report
        Image.open(tmp_path / "c_thumbs" / f"clip_000_{side}.png").verify()
    # an earlier run's json= stands for a side
    main([str(b), f"json={tmp_path / 'b.json'}"])
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "b.json")]) == 1
    again = json.loads(capsys.readouterr().out)
    assert again["delta"] == result["delta"]
    with pytest.raises(UserError, match="c.json: not the json= of a `python -m magitrain.eval CLIPS...` run"):
        main(["compare", str(a), str(tmp_path / "c.json")])  # a compare's json holds differences


def test_prompts_pair_with_infer_outputs(tmp_path, monkeypatch):
    """The prompts file infer.py generated from pairs with the clips it wrote: infer.py accepts the
    eval's `speech` and `language` keys, names row i NAME_00i.mp4 (or the row's `out`), and the
    evaluator gives each clip its own row, whatever else the folder holds."""
    monkeypatch.syspath_prepend(str(REPO))
    import infer

    rows = [
        {"prompt": 'A man says "good morning".', "seed": 3},
        {
            "prompt": "A woman sings.",
            "speech": "la la la",
            "language": "en",
            "out": str(tmp_path / "song.mp4"),
        },
        {"prompt": "她说你好。", "speech": "你好", "language": "zh"},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    cfg = infer.parse([f"prompts={prompts}", f"out={tmp_path / 'clip.mp4'}"])
    written = [Path(job["out"]).name for job in infer.jobs(cfg)]
    assert written == ["clip_000.mp4", "song.mp4", "clip_002.mp4"]
    references, notes = pair(read_prompt_rows(str(prompts)), ["aaa.mp4", *reversed(written)])
    assert notes == []
    assert references["clip_000.mp4"].expected_speech == "good morning"
    assert references["song.mp4"].speech == "la la la" and references["song.mp4"].language == "en"
    assert references["clip_002.mp4"].prompt == "她说你好。" and references["clip_002.mp4"].language == "zh"
    assert "aaa.mp4" not in references
    # rows without numbers or names pair with the clips in sorted order; a row beyond them is noted
    plain = tmp_path / "p.txt"
    plain.write_text("first\n\nsecond\nthird\n")
    references, notes = pair(read_prompt_rows(str(plain)), ["b.mp4", "a.mp4"])
    assert {k: v.prompt for k, v in references.items()} == {"a.mp4": "first", "b.mp4": "second"}
    assert notes == ["prompts row 3 (by order): no such clip"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "speach": "y"}\n')
    with pytest.raises(UserError, match="bad.jsonl line 1: unknown key 'speach'; did you mean speech"):
        read_prompt_rows(str(tmp_path / "bad.jsonl"))


def test_bootstrap():
    """Seeded (the same numbers give the same interval), None left out, a constant has a zero-width
    interval, and for 400 draws of N(0, 1) the interval is about mean +- 1.96 / sqrt(400)."""
    values = list(np.random.default_rng(0).normal(0, 1, 400))
    stat = bootstrap(values + [None])
    assert stat == bootstrap(values) and stat["n"] == 400
    low, high = stat["ci95"]
    assert low < stat["mean"] < high
    assert high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert bootstrap([2.0, 2.0, 2.0]) == {"mean": 2.0, "ci95": [2.0, 2.0], "n": 3}
    assert bootstrap([None]) == {"mean": None, "ci95": [None, None], "n": 0}
    deltas = paired_deltas(
        {"x": {"m": 1.0}, "y": {"m": 2.0}, "z": {"m": 5.0}}, {"x": {"m": 2.0}, "y": {"m": None}}
    )
    assert deltas == {"m": {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1}}


def test_cli_runs_the_model_metrics(tmp_path):
    """With eval.asr_path/clip_path/syncnet_path set (random-weight Whisper, CLIP and SyncNet of the
    real classes), every clip gets wer, cer, clip_score, lse_d and lse_c, finite, beside the
    weight-free ones; a clip whose prompt holds no speech skips wer/cer (said under "skipped", not an
    error: the run exits 0). Catches the evaluator calling the metric objects by a name they lack."""
    from test_eval_models import SPEECH, tiny_clip_dir, tiny_syncnet_file, tiny_whisper_dir

    from magitrain.data.synthetic import make_speech_clip

    clips = tmp_path / "clips"
    for folder in (clips, tmp_path / "whisper", tmp_path / "clip"):
        folder.mkdir()
    make_speech_clip(clips / "clip_000.mp4", SPEECH, "en", seconds=1.2, audio_seconds=1.2)
    make_speech_clip(clips / "clip_001.mp4", "你好，世界。", "cmn", seconds=1.2, audio_seconds=1.2, fps=30)
    make_speech_clip(clips / "clip_002.mp4", SPEECH, "en", seconds=1.2, audio_seconds=1.2, seed=2)
    rows = [
        {"prompt": f'A man says "{SPEECH}"', "language": "en"},
        {"prompt": "她说你好", "speech": "你好，世界。", "language": "zh"},
        {"prompt": "A man talks."},  # nothing to score wer against
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    code = main([
        str(clips), f"prompts={prompts}", f"json={tmp_path / 'o.json'}", "eval.device=cpu",
        f"eval.asr_path={tiny_whisper_dir(tmp_path / 'whisper')}",
        f"eval.clip_path={tiny_clip_dir(tmp_path / 'clip')}",
        f"eval.syncnet_path={tiny_syncnet_file(tmp_path / 'syncnet.safetensors')}",
    ])  # fmt: skip
    scores = json.loads((tmp_path / "o.json").read_text())
    model = {"wer", "cer", "clip_score", "lse_d", "lse_c"}
    for name in ("clip_000.mp4", "clip_001.mp4"):
        row = scores["clips"][name]
        assert "error" not in row and "skipped" not in row, row
        assert model | WEIGHT_FREE <= set(row) and all(np.isfinite(row[k]) for k in model)
    third = scores["clips"]["clip_002.mp4"]
    assert {"clip_score", "lse_d", "lse_c"} <= set(third) and not {"wer", "cer", "error"} & set(third)
    assert "no reference speech" in third["skipped"]
    assert code == 0
    assert model <= set(scores["aggregate"]) and scores["aggregate"]["wer"]["n"] == 2
