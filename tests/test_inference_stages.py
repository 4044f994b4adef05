"""The pipeline's stages at toy size on the CPU: the video decoder choice (Turbo-VAED or Wan2.2),
stage-wise residency (`offload=stages`), the stage timer's peak memory and the Table 2 benchmark
with both decoders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from magitrain.codecs import build_tiny_codecs
from magitrain.codecs.turbo_vaed import TurboVideoDecoder
from magitrain.inference import MagiHumanPipeline, StageTimer, format_table
from magitrain.inference.benchmark import run_benchmark
from magitrain.model import MagiHumanDiT, get_config

SIZE, SECONDS = "64x32", 0.32  # 9 frames, a 3 x 2 x 4 latent


@pytest.fixture(scope="module")
def networks() -> tuple[MagiHumanDiT, MagiHumanDiT]:
    torch.manual_seed(0)
    return MagiHumanDiT(get_config("tiny")).eval(), MagiHumanDiT(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def turbo_codecs():
    return build_tiny_codecs(seed=0, video_decoder="turbo")


def _generate(pipe: MagiHumanPipeline):
    latents, timer, meta = pipe.generate_latents("a dog barks", seconds=SECONDS, resolution=SIZE, sr="128x64")
    return latents, pipe.decode(*latents, timer), meta


def test_generation_decodes_with_the_selected_video_decoder(networks, turbo_codecs):
    pipe = MagiHumanPipeline(networks[0], turbo_codecs, networks[1], device="cpu")
    (video_latent, audio_latent), (video, audio, rate, _), meta = _generate(pipe)
    assert isinstance(turbo_codecs.video_decoder, TurboVideoDecoder) and meta["video_decoder"] == "turbo"
    assert video.shape == (3, 9, 64, 128)
    assert torch.equal(video, turbo_codecs.video_decoder.decode(video_latent)[0])
    wan, *_ = pipe.decode(video_latent, audio_latent, StageTimer("cpu"), video_decoder=turbo_codecs.video)
    assert wan.shape == video.shape and not torch.allclose(wan, video)


def test_offload_stages_keeps_one_stage_resident_and_the_same_output(networks, turbo_codecs):
    base, sr = networks
    expected = _generate(MagiHumanPipeline(base, turbo_codecs, sr, device="cpu"))
    pipe = MagiHumanPipeline(base, turbo_codecs, sr, device="cpu", offload="stages")
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, pipe.residency.resident())

        return hook

    hooks = [net.register_forward_pre_hook(record(name)) for name, net in (("base", base), ("sr", sr))]
    try:
        got = _generate(pipe)
    finally:
        for hook in hooks:
            hook.remove()
    for a, b in zip([*expected[0], *expected[1][:2]], [*got[0], *got[1][:2]], strict=True):
        assert torch.equal(a, b)
    assert got[2]["offload"] == "stages"
    # while a network runs, only its stage and the prefetched next one are on the device
    assert seen == {"base": {"base", "sr"}, "sr": {"sr", "decode"}}
    assert pipe.residency.log == [
        ("load", "text"), ("prefetch", "base"), ("release", "text"),
        ("load", "base"), ("prefetch", "sr"), ("release", "base"),
        ("load", "sr"), ("prefetch", "decode"), ("release", "sr"),
        ("load", "decode"), ("release", "decode"),
    ]  # fmt: skip
    assert pipe.residency.resident() == set()
    codecs_only = MagiHumanPipeline(base, turbo_codecs, sr, device="cpu", offload="codecs")
    assert set(codecs_only.residency.stages) == {"text", "image", "given", "decode"}  # given: audio=, video=
    assert codecs_only.offload == "codecs"
    with pytest.raises(ValueError, match="offload must be one of"):
        MagiHumanPipeline(base, turbo_codecs, sr, device="cpu", offload="all")


class CountingMemory:
    """A stand-in for the CUDA allocator's counters (the CPU has none), driven by the test."""

    def __init__(self):
        self.now, self.top = 0, 0

    def alloc(self, n: int) -> None:
        self.now += n
        self.top = max(self.top, self.now)

    def allocated(self) -> int:
        return self.now

    def peak(self) -> int:
        return self.top

    def reset_peak(self) -> None:
        self.top = self.now


def test_stage_timer_peak_memory_per_stage_with_nesting():
    gib = 2**30
    memory = CountingMemory()
    timer = StageTimer("cpu", memory=memory)
    memory.alloc(1 * gib)
    with timer("base"):
        memory.alloc(4 * gib)
        memory.alloc(-4 * gib)
    with timer("decode"):
        memory.alloc(2 * gib)
        with timer("decode_video"):
            memory.alloc(3 * gib)  # the decode peak (6 GiB) happens inside the inner stage
            memory.alloc(-3 * gib)
        with timer("decode_audio"):
            memory.alloc(1 * gib)
            memory.alloc(-1 * gib)
        memory.alloc(-2 * gib)
    assert timer.peak_gib == {"base": 5.0, "decode": 6.0, "decode_video": 6.0, "decode_audio": 4.0}
    row = timer.row("256p")
    assert row["peak_gib"]["decode"] == 6.0 and row["total"] == pytest.approx(row["base"] + row["decode"])
    assert "| Peak GiB base / SR / decode |" in format_table([row]) and "| 5.0 / - / 6.0 |" in format_table(
        [row]
    )
    assert "peak_gib" not in StageTimer("cpu").row("256p")  # no counters on the CPU


def test_benchmark_rows_for_both_decoders_at_toy_size(turbo_codecs):
    rows = run_benchmark(
        "tiny", ("none", "128x64"), seconds=SECONDS, resolution=SIZE, codecs=turbo_codecs, device="cpu",
        repeats=1, warmup=0,
    )  # fmt: skip
    assert [(r["output"], r["decoder"]) for r in rows] == [
        (SIZE, "turbo"), (SIZE, "wan"), ("128x64", "turbo"), ("128x64", "wan")]  # fmt: skip
    for row in rows:
        assert row["decode"] >= row["decode_video"] > 0 and row["decode_audio"] > 0
        assert row["total"] == pytest.approx(row["base"] + (row["sr"] or 0) + row["decode"])
    # the decoders of one output share its base and SR runs
    assert rows[0]["base"] == rows[1]["base"] and rows[2]["sr"] == rows[3]["sr"] > 0
    table = format_table(rows)
    assert "| output | Base | SR | Decode | Total | Decoder |" in table and "| turbo |" in table


def test_infer_py_benchmark_writes_every_row_and_column(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    import infer

    out = tmp_path / "bench.json"
    infer.main(["benchmark=true", "model=tiny", "codecs=tiny", "codecs.video_decoder=turbo",
                f"seconds={SECONDS}", f"resolution={SIZE}", "bench_rows=[none,128x64]", "bench_repeats=1",
                f"out={out}"])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["columns"] == ["output", "base", "sr", "decode", "total"]
    assert [(r["output"], r["decoder"]) for r in report["rows"]] == [
        (SIZE, "turbo"), (SIZE, "wan"), ("128x64", "turbo"), ("128x64", "wan")]  # fmt: skip
    assert "| output | Base | SR | Decode | Total | Decoder |" in capsys.readouterr().out


def test_offload_codecs_with_an_image_and_the_wan_decoder_in_two_stages(networks):
    # codecs.video serves the image stage and (as the Wan2.2 decoder) the decode stage
    codecs = build_tiny_codecs(seed=0)
    image = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    options = dict(seconds=SECONDS, resolution=SIZE, image=image)
    expected = MagiHumanPipeline(networks[0], codecs, device="cpu").generate("a cat", **options)
    pipe = MagiHumanPipeline(networks[0], codecs, device="cpu", offload="codecs")
    got = pipe.generate("a cat", **options)
    assert torch.equal(got.video, expected.video) and torch.equal(got.audio, expected.audio)
    loads = [entry for entry in pipe.residency.log if entry[0] != "release"]
    # the base DiT stays on the device; while it runs, the decoders are copied in
    assert loads == [("load", "text"), ("prefetch", "image"), ("load", "image"), ("prefetch", "decode"),
                     ("load", "decode")]  # fmt: skip
    assert pipe.residency.resident() == set()


def test_the_sr_architecture_follows_the_checkpoint_not_the_spelling(tmp_path, monkeypatch, caplog):
    """`sr=1920x1088` with a 1080p SR checkpoint runs its local attention as `sr=1080p` does: the
    checkpoint's config.json decides, else `sr_model=`, else the output's size class (was: the
    1080p preset only for the literal `sr=1080p`)."""
    monkeypatch.syspath_prepend(str(REPO))
    import infer
    from magitrain.checkpoint import save_official

    assert infer.sr_architecture("1080p", None) == (None, "magihuman_15b_sr1080")
    assert infer.sr_architecture("1920x1088", None) == (None, "magihuman_15b_sr1080")
    assert infer.sr_architecture("1088x1920", None) == (None, "magihuman_15b_sr1080")  # portrait
    assert infer.sr_architecture("896x512", None) == (None, "magihuman_15b_sr540")
    assert infer.sr_architecture("1920x1088", "540p") == ("magihuman_15b_sr540", "magihuman_15b_sr1080")
    assert infer.sr_architecture("540p", "tiny_sr1080")[0] == "tiny_sr1080"
    save_official(MagiHumanDiT(get_config("tiny_sr1080")), tmp_path / "sr1080")
    for sr in ("1080p", "1920x1088", "128x64"):
        cfg = infer.InferConfig(sr_ckpt=str(tmp_path / "sr1080"), sr=sr)
        with caplog.at_level("INFO", logger="magitrain"):
            network = infer.load_sr_network(cfg, sr, torch.float32)
        assert network.config.local_attn_layers == get_config("tiny_sr1080").local_attn_layers
        assert "SR network (sr_ckpt's config" in caplog.text and "local attention in 3 of 4" in caplog.text
