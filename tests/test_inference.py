"""Inference on CPU at tiny size: infer.py end to end (real tiny codecs, a real mp4), the pipeline's
samplers and SR stage, checkpoint errors, the stage-timing table and the benchmark mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from magitrain.checkpoint import CheckpointMismatchError, save_official
from magitrain.codecs import build_tiny_codecs
from magitrain.inference import ClipShape, MagiHumanPipeline, StageTimer, load_network, parse_resolution
from magitrain.model import MagiHumanDiT, get_config

SIZE, SECONDS = "64x32", 0.32  # 9 frames, a 3 x 2 x 4 latent: the tiny codecs take seconds here


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(get_config("tiny")), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt) -> MagiHumanPipeline:
    model = load_network(tiny_ckpt, "tiny").eval()
    torch.manual_seed(1)
    sr_model = MagiHumanDiT(get_config("tiny")).eval()
    return MagiHumanPipeline(model, build_tiny_codecs(seed=0), sr_model, device="cpu")


def test_clip_shapes_follow_the_release():
    clip = ClipShape.of(5, "256p")
    assert (clip.width, clip.height, clip.frames) == (448, 256, 126)
    assert clip.latent_size == (32, 16, 28) and clip.audio_tokens == 126
    assert clip.with_resolution("540p").latent_size == (32, 32, 56)
    assert clip.with_resolution("1080p").latent_size == (32, 68, 120)
    # floored to multiples of 32 as the release floors them (was refused)
    assert (ClipShape.of(1, "1280x720").width, ClipShape.of(1, "1280x720").height) == (1280, 704)
    assert ClipShape.of(1, "480x272").with_resolution("1930x1090").latent_size == (7, 68, 120)
    assert (parse_resolution("480x272"), parse_resolution("100x64")) == ((480, 256), (96, 64))
    with pytest.raises(ValueError, match="at least 32 pixels"):
        ClipShape.of(1, "100x31")
    # the base stage takes the SR clip's orientation: a portrait SR clip gets a portrait base stage
    base, high = ClipShape.stages(5, "256p", "1088x1920")
    assert (base.width, base.height, base.frames, high.width, high.height) == (256, 448, 126, 1088, 1920)
    assert ClipShape.stages(5, "256p", "1080p") == (clip, clip.with_resolution("1080p"))
    assert ClipShape.stages(5, "256x448", None) == (ClipShape(256, 448, 126), None)
    with pytest.raises(ValueError, match="neither a preset"):
        ClipShape.of(1, "720p")


def infer_py(ckpt: Path, out: Path, *extra: str, prompt: str | None = "A man says hello") -> list[str]:
    """The arguments of `python infer.py` with the tiny model at the tests' size."""
    prompt_arg = [f"prompt={prompt}"] if prompt is not None else []
    tiny = ["model=tiny", "codecs=tiny", f"seconds={SECONDS}", f"resolution={SIZE}", "seed=7"]
    return ["infer.py", f"ckpt={ckpt}", *tiny, f"out={out}", *prompt_arg, *extra]


def test_infer_py_writes_a_readable_mp4_with_sound_and_timings(tiny_ckpt, pipe, tmp_path):
    out = tmp_path / "clip.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (conftest)
    cmd = [sys.executable, *infer_py(tiny_ckpt, out)]  # a process of its own; the tests below run in this one
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| output | Base | SR | Decode | Total |" in result.stdout

    import decord

    reader = decord.VideoReader(str(out))
    assert len(reader) == 9 and reader.get_avg_fps() == 25.0
    assert reader[0].shape == (32, 64, 3)
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert audio.sample_rate == 44100 and audio.channels == 2
        samples = sum(f.samples for f in container.decode(audio=0))
    # 9 audio tokens x 1764 samples at 44.1 kHz = 9 / 25 s (AAC adds its 1024-sample priming frame at most)
    assert 9 * 1764 <= samples <= 9 * 1764 + 1024

    timings = json.loads(out.with_suffix(".json").read_text())
    assert timings["columns"] == ["output", "base", "sr", "decode", "total"]
    row = timings["rows"][0]
    assert row["output"] == SIZE and row["sr"] is None
    assert row["total"] == pytest.approx(row["base"] + row["decode"])

    # The same seed in another process (same codecs config, same weights): the same file, byte for byte.
    options = dict(seconds=SECONDS, resolution=SIZE)
    again = pipe.generate("A man says hello", seed=7, **options).save(tmp_path / "b.mp4")
    assert out.read_bytes() == again.read_bytes()
    (v7, _), _, _ = pipe.generate_latents("A man says hello", seed=7, **options)
    (v8, _), _, _ = pipe.generate_latents("A man says hello", seed=8, **options)
    assert not torch.equal(v7, v8)


def test_distilled_and_cfg_samplers_and_the_sr_stage(pipe, tmp_path):
    clip = ClipShape.of(SECONDS, SIZE)
    timer = StageTimer("cpu")
    distilled = pipe.encode_prompt("a dog barks", guidance=False)
    video, audio = pipe.sample(distilled, clip, timer, steps=8, sampler="distilled", seed=1)
    assert video.shape == (1, 48, 3, 2, 4) and audio.shape == (1, 9, 64)
    guided = pipe.encode_prompt("a dog barks", guidance=True)
    assert guided.negative is not None and guided.negative.shape[-1] == 64
    v32, a32 = pipe.sample(guided, clip, timer, steps=32, sampler="base", seed=1)
    assert v32.shape == video.shape and not torch.allclose(v32, video)
    assert set(timer.seconds) == {"base"}

    # Image-to-video with an SR stage: the SR latent's frame 0 is the image's latent at the SR size.
    image = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (video, audio), timer, meta = pipe.generate_latents(
        "a dog barks", seconds=SECONDS, resolution=SIZE, sr="128x64", image=image
    )
    torch.testing.assert_close(video[:, :, :1], pipe.encode_image(image, clip.with_resolution("128x64")))
    assert video.shape == (1, 48, 3, 4, 8) and meta["sr"] == "128x64"
    pixels, wave, rate, frames = pipe.decode(video, audio, timer)
    assert pixels.shape == (3, 9, 64, 128) and wave.shape == (2, 9 * 1764) and rate == 44100
    assert frames.shape == (9, 64, 128, 3) and frames.dtype == torch.uint8
    assert set(timer.row("128x64")) >= {"output", "text", "image", "base", "sr", "decode", "total"}
    with pytest.raises(ValueError, match="steps=12 has no default sampler"):
        pipe.generate("x", seconds=SECONDS, resolution=SIZE, steps=12)


def test_a_portrait_sr_clip_runs_a_portrait_base_stage(pipe):
    """resolution=64x32 (the landscape base preset) with sr=64x128 (portrait): the base network runs
    on a 32x64 (WxH) latent grid, the SR network on 64x128; a landscape base stretched onto the
    portrait clip would distort it. Catches the base stage ignoring the SR clip's orientation
    (checked by planting it: this test then fails)."""
    grids = {}
    hooks = [
        network.register_forward_pre_hook(
            lambda m, args, name=name: grids.setdefault(name, set()).add(args[0].shape[-2:])
        )
        for name, network in (("base", pipe.model), ("sr", pipe.sr_model))
    ]
    try:
        (video, _), _, _ = pipe.generate_latents("a dog barks", seconds=SECONDS, resolution=SIZE, sr="64x128")
    finally:
        for hook in hooks:
            hook.remove()
    assert grids == {"base": {(4, 2)}, "sr": {(8, 4)}} and video.shape[-2:] == (8, 4)


def test_sr_validation_upsamples_the_base_stage_the_portrait_sr_clip_refined(pipe, tmp_path):
    """The validation callback's `sampleI_lr_up.mp4` beside a portrait SR clip is the base stage that
    clip refined (portrait, the same seed), not a landscape one generated at `resolution` as given.
    Catches `_upsampled_base` ignoring the orientation rule (checked by planting it: this test then
    fails)."""
    from magitrain.callbacks.validation import _upsampled_base

    options = dict(seconds=SECONDS, resolution=SIZE, sr="64x128", seed=3)
    grids = []
    hook = pipe.model.register_forward_pre_hook(lambda m, args: grids.append(args[0].shape[-2:]))
    try:
        path = _upsampled_base(pipe, "a dog barks", options, (128, 64), tmp_path / "sample0.mp4")
    finally:
        hook.remove()
    assert path.name == "sample0_lr_up.mp4" and path.is_file()
    assert set(grids) == {(4, 2)}  # a 32x64 (WxH) base stage, as the SR generation ran


def test_checkpoint_errors_name_the_file(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*nowhere: no such file"):
        load_network(tmp_path / "nowhere", "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ckpt: .*empty holds neither model.safetensors.index.json"):
        load_network(tmp_path / "empty", "tiny")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"ckpt=.*junk.ckpt is neither a released-layout checkpoint"):
        load_network(tmp_path / "junk.ckpt", "tiny")
    torch.save({"weights": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain.pt is a torch file without 'state_dict'"):
        load_network(tmp_path / "plain.pt", "tiny")
    with pytest.raises(CheckpointMismatchError, match=r"sr_ckpt: checkpoint .*tiny does not match the model"):
        load_network(tiny_ckpt, "golden_tiny", field="sr_ckpt")
    with pytest.raises(ValueError, match="released-layout checkpoint: it has no separate EMA"):
        load_network(tiny_ckpt, "tiny", weights="ema")


def test_infer_py_arguments_fail_with_the_field_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import infer
    from magitrain.errors import UserError

    with pytest.raises(FileNotFoundError, match=r"ckpt=.*missing: no such file or directory"):
        infer.main([f"ckpt={tmp_path / 'missing'}", "prompt=hi", "codecs=tiny", "model=tiny"])
    with pytest.raises(UserError, match="sr=540p needs sr_ckpt=PATH"):
        infer.main([f"ckpt={tmp_path}", "prompt=hi", "sr=540p"])
    with pytest.raises(UserError, match="key=value arguments"):
        infer.main(["prompt", "hi"])
    with pytest.raises(UserError, match="codecs=nope: no .*nope.yaml"):
        infer.build_codecs("nope", {}, torch.float32)
    with pytest.raises(UserError, match="seconds=five: expected a number"):
        infer.parse(["seconds=five"])
    with pytest.raises(UserError, match="unknown key 'sead' \\(did you mean seed\\?\\)"):
        infer.parse(["sead=1"])
    with pytest.raises(UserError, match="codecs=tiny has no field 'decode_tile'"):
        infer.build_codecs("tiny", {"decode_tile": "512"}, torch.float32)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "seed": "1"}\n')
    with pytest.raises(UserError, match=r"p.jsonl line 2: seed must be a int"):
        infer.read_prompt_rows(str(tmp_path / "p.jsonl"))


def test_infer_py_latents_out_writes_the_final_latents_beside_or_without_the_mp4(
    pipe, tiny_ckpt, tmp_path, script
):
    """Issue 23: `latents_out=` writes the final latents (video [48, T, H, W], audio [N, 64], float32)
    the pipeline returns for the clip's prompt and seed; `decode=false` skips the decode stage and the
    mp4; with prompts=FILE one file per line, named as the mp4s. (Before: unknown keys.)"""
    options = dict(seconds=SECONDS, resolution=SIZE)
    result = script(
        *infer_py(tiny_ckpt, tmp_path / "clip.mp4", f"latents_out={tmp_path / 'clip.safetensors'}")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "clip.mp4").is_file()
    (video, audio), _, _ = pipe.generate_latents("A man says hello", seed=7, **options)
    saved = load_file(tmp_path / "clip.safetensors")
    assert sorted(saved) == ["audio", "video"]
    assert saved["video"].shape == (48, 3, 2, 4) and saved["audio"].shape == (9, 64)
    assert saved["video"].dtype == saved["audio"].dtype == torch.float32
    assert torch.equal(saved["video"], video[0]) and torch.equal(saved["audio"], audio[0])

    (tmp_path / "prompts.txt").write_text("first one\nA man says hello\n")
    batch = tmp_path / "batch"
    result = script(*infer_py(
        tiny_ckpt, batch / "c.mp4", f"prompts={tmp_path / 'prompts.txt'}", "decode=false",
        f"latents_out={batch / 'lat.safetensors'}", prompt=None,
    ))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in batch.iterdir()) == ["lat_000.safetensors", "lat_001.safetensors"]
    assert torch.equal(load_file(batch / "lat_001.safetensors")["video"], video[0])
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {SIZE} |")]
    assert len(rows) == 2 and all(row.split("|")[4].strip() == "-" for row in rows)  # Decode: not run


def test_latents_without_decoding_and_after_the_sr_stage(pipe, tmp_path):
    """decode=False returns the latents only (no decode stage timed, no mp4 to save); with an SR
    stage the saved video latent is the SR stage's."""
    options = dict(seconds=SECONDS, resolution=SIZE, sr="128x64", seed=3)
    clip = pipe.generate("A dog barks", decode=False, **options)
    assert clip.frames is None and clip.timings["decode"] is None and clip.timings["sr"] is not None
    with pytest.raises(ValueError, match="decode=False"):
        clip.save(tmp_path / "x.mp4")
    saved = load_file(clip.save_latents(tmp_path / "sr.safetensors"))
    (video, audio), _, _ = pipe.generate_latents("A dog barks", **options)
    assert saved["video"].shape == (48, 3, 4, 8) and torch.equal(saved["video"], video[0].float())
    assert torch.equal(saved["audio"], audio[0].float())


def test_infer_py_latents_out_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import infer
    from magitrain.errors import UserError

    with pytest.raises(UserError, match="decode=false writes no mp4: give latents_out=FILE.safetensors"):
        infer.main([f"ckpt={tmp_path}", "prompt=hi", "decode=false"])
    with pytest.raises(UserError, match=r"latents_out=.*x.pt: expected a FILE.safetensors"):
        infer.main([f"ckpt={tmp_path}", "prompt=hi", f"latents_out={tmp_path / 'x.pt'}"])


def test_infer_py_values_are_verbatim_text_or_typed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import infer

    cfg = infer.parse(
        ["prompt=a=b: [laughs] {x} 'q' \"dq\" ${oc.env:HOME}\nnext", "negative_prompt=", "image=/p/a b:c.png",
         "seconds=1.5", "compile=true", "bench_rows=[none,540p]", "sampler=none", "codecs.decode_tile=512"]
    )  # fmt: skip
    assert cfg.prompt == "a=b: [laughs] {x} 'q' \"dq\" ${oc.env:HOME}\nnext"
    assert cfg.negative_prompt == "" and cfg.image == "/p/a b:c.png" and cfg.sampler == "none"
    assert (cfg.seconds, cfg.compile, cfg.bench_rows) == (1.5, "blocks", ["none", "540p"])  # true: blocks
    assert cfg.codecs_fields == {"decode_tile": "512"}
    assert infer.parse(["compile=step", "cp=2"]).compile == "step" and infer.parse(["cp=2"]).cp == 2
    with pytest.raises(infer.UserError, match="compile=graph: expected one of none, blocks, step"):
        infer.parse(["compile=graph"])


def test_infer_py_help_lists_every_field_with_its_default_and_doc(monkeypatch, script):
    monkeypatch.syspath_prepend(str(REPO))
    import dataclasses

    import infer

    result = script("infer.py", "--help")
    assert result.returncode == 0, result.stderr
    assert script("infer.py", "-h").stdout == result.stdout
    for f in dataclasses.fields(infer.InferConfig):
        key = f.metadata["key"] or f"{f.name}={f.default}"
        if f.name == "bench_rows":
            key = "bench_rows=[none,540p,1080p]"
        lines = [line for line in result.stdout.splitlines() if line.split()[:1] == [key]]
        assert len(lines) == 1 and f.metadata["doc"] in lines[0], (key, result.stdout)
    assert "codecs.FIELD=VALUE" in result.stdout and "codecs_args" not in result.stdout


TRICKY = "A person speaks: \"Guten Morgen\" [laughs] {x} a=b 'ok' ünïcode ✓\nsecond line: - [ ]"


def test_infer_py_takes_any_text_as_a_prompt_and_prompt_files(tiny_ckpt, tmp_path, script):
    single = tmp_path / "single.mp4"
    result = script(*infer_py(tiny_ckpt, single, f"negative_prompt={TRICKY}", prompt=TRICKY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(single.with_suffix(".json").read_text())["prompt"] == TRICKY

    rows = [{"prompt": TRICKY, "seed": 7, "negative_prompt": TRICKY}, {"prompt": "[laughs] hi", "seed": 8,
            "out": str(tmp_path / "own name.mp4")}]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n"
    )
    batch = tmp_path / "batch" / "clip.mp4"
    result = script(*infer_py(tiny_ckpt, batch, f"prompts={tmp_path / 'prompts.jsonl'}"))
    assert result.returncode == 2 and "prompt=TEXT or prompts=FILE, not both" in result.stderr
    result = script(*infer_py(tiny_ckpt, batch, f"prompts={tmp_path / 'prompts.jsonl'}", prompt=None))
    assert result.returncode == 0, result.stderr[-3000:]
    first = tmp_path / "batch" / "clip_000.mp4"
    assert first.read_bytes() == single.read_bytes()  # the row's prompt and seed, verbatim
    assert (tmp_path / "own name.mp4").is_file() and not (tmp_path / "batch" / "clip_001.mp4").exists()
    summary = json.loads(batch.with_suffix(".json").read_text())
    assert [r["prompt"] for r in summary["rows"]] == [TRICKY, "[laughs] hi"]
    assert [r["seed"] for r in summary["rows"]] == [7, 8]

    (tmp_path / "prompts.txt").write_text("first: one\n\n[second] 'two' = \"2\"\n")
    result = script(
        *infer_py(tiny_ckpt, tmp_path / "txt" / "c.mp4", f"prompts={tmp_path / 'prompts.txt'}", prompt=None)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    made = sorted(p.name for p in (tmp_path / "txt").glob("*.mp4"))
    assert made == ["c_000.mp4", "c_001.mp4"]
    second = json.loads((tmp_path / "txt" / "c_001.json").read_text())
    assert second["prompt"] == "[second] 'two' = \"2\"" and second["seed"] == 7


def test_benchmark_rows_at_tiny_size(tmp_path):
    from magitrain.inference.benchmark import run_benchmark

    rows = run_benchmark(
        "tiny", ("none", "128x64", "a2v"), seconds=SECONDS, resolution=SIZE, codecs=build_tiny_codecs(),
        device="cpu", repeats=1, warmup=0,
    )  # fmt: skip
    assert [r["output"] for r in rows] == [SIZE, "128x64", f"{SIZE} a2v"]
    assert rows[0]["sr"] is None and rows[1]["sr"] > 0 and rows[2]["sr"] is None
    assert "given" not in rows[0] and rows[2]["given"] > 0  # the a2v row times its sound's encoding
    for row in rows:
        assert row["total"] == pytest.approx(row["base"] + (row["sr"] or 0) + row["decode"])
