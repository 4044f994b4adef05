"""`compile=step`: each sampler's whole denoising step as one torch.compile graph, equal to eager,
with its compilation timed as warm-up apart from the stages."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from magitrain.codecs import build_tiny_codecs
from magitrain.inference import ClipShape, MagiHumanPipeline, StageTimer
from magitrain.model import MagiHumanDiT, tiny

CLIP = ClipShape.of(0.32, "64x32")


def _network(seed: int, **overrides) -> MagiHumanDiT:
    torch.manual_seed(seed)
    return MagiHumanDiT(tiny(**overrides)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def codecs():
    return build_tiny_codecs(seed=0)


def test_compiled_step_equals_eager_and_its_compilation_is_warm_up(codecs):
    # inductor on the CPU (a C++ compiler): one small case, two layers, the distilled sampler
    model = _network(0, num_layers=2, sandwich_layers=(0,), gelu7_layers=(0,))
    eager = MagiHumanPipeline(model, codecs, device="cpu", precision="fp32")
    compiled = MagiHumanPipeline(model, codecs, device="cpu", precision="fp32", compile="step")
    text = eager.encode_prompt("a dog barks", guidance=False)
    want = eager.sample(text, CLIP, StageTimer("cpu"), seed=1)

    torch._dynamo.reset()
    counters.clear()
    timer = StageTimer("cpu")
    got = compiled.sample(text, CLIP, timer, seed=1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1  # the whole step
    warm = timer.warmup_seconds["base"]
    assert warm > timer.seconds["base"]  # compiling outlasts the 8 compiled steps, and is not in them
    row = timer.row("64x32")
    assert row["warmup"] == {"base": warm} and row["total"] == pytest.approx(row["base"])

    again = StageTimer("cpu")
    repeat = compiled.sample(text, CLIP, again, seed=1)
    assert not again.warmup_seconds and counters["stats"]["unique_graphs"] == 1  # no recompilation
    assert all(torch.equal(a, b) for a, b in zip(repeat, got, strict=True))


def test_cfg_and_sr_steps_are_one_graph_each(codecs):
    """The CFG step (two forwards + guidance) and the SR step (local attention, image frame) trace
    whole: checked with the aot_eager backend (no C++ build), against the eager samplers."""
    model = _network(0)
    sr_model = _network(1, coords_style="v1", local_attn_layers=(1, 2), frame_window=1)
    eager = MagiHumanPipeline(model, codecs, sr_model, device="cpu", precision="fp32")
    compiled = MagiHumanPipeline(
        model, codecs, sr_model, device="cpu", precision="fp32", compile="step", compile_backend="aot_eager"
    )
    text = eager.encode_prompt("a dog barks", guidance=True)
    sr_clip = CLIP.with_resolution("128x64")
    image = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = (eager.encode_image(image, CLIP), eager.encode_image(image, sr_clip))
    options = dict(steps=4, sampler="base", seed=2, sr_clip=sr_clip, image_latents=images)
    want = eager.sample(text, CLIP, StageTimer("cpu"), **options)

    torch._dynamo.reset()
    counters.clear()
    timer = StageTimer("cpu")
    got = compiled.sample(text, CLIP, timer, **options)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2
    assert set(timer.warmup_seconds) == {"base", "sr"}
