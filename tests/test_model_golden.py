"""Parity of MagiHumanDiT with the released implementation's own numbers (shared/golden)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from magitrain.checkpoint import load_official
from magitrain.model import MagiHumanDiT, golden_tiny

SR_LOCAL = dict(local_attn_layers=(0, 1, 2, 4, 5, 6), frame_window=1)
CASES = {  # fixture -> (config overrides, coords style, output-key suffix)
    "forward_base_v2": ({}, "v2", ""),
    "forward_base_v1": ({}, "v1", ""),
    "forward_sr_local": (SR_LOCAL, "v1", "@maskedsdpa"),
}


def _run(golden_dir, name: str, native: bool):
    overrides, style, suffix = CASES[name]
    model = load_official(MagiHumanDiT(golden_tiny(**overrides)), golden_dir / "weights_tiny.safetensors")
    fx = load_file(golden_dir / f"{name}{'' if native else '_fp32'}.safetensors")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=native):
        v_video, v_audio = model(
            fx["in.video_latent"],
            fx["in.audio_latent"],
            fx["in.text_embed_padded"],
            text_len=fx["in.text_len"].reshape(1),
            coords_style=style,
        )
    return (v_video, fx[f"out.video_velocity{suffix}"]), (v_audio, fx[f"out.audio_velocity{suffix}"])


def _rms_rel(out, ref):
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_matches_released(golden_dir, name):
    for out, ref in _run(golden_dir, name, native=False):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 2e-5


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_forward_follows_released_numerics(golden_dir, name):
    for out, ref in _run(golden_dir, name, native=True):
        assert _rms_rel(out, ref) <= 2e-2


def test_local_attention_changes_the_output(golden_dir):
    """The SR fixture with local attention off is 0.12 rms apart: our local layers must matter."""
    fx = load_file(golden_dir / "forward_sr_local_fp32.safetensors")
    (v_video, _), _ = _run(golden_dir, "forward_sr_local", native=False)
    global_tokens = fx["out.tokens@all_global_attention"]
    local_tokens = fx["out.tokens@maskedsdpa"]
    assert (global_tokens - local_tokens).abs().max() > 0.1
    assert (v_video - fx["out.video_velocity@maskedsdpa"]).abs().max() <= 2e-5


def test_local_mask_equals_released_mask(golden_dir):
    from magitrain.model import SequenceLayout

    fx = load_file(golden_dir / "forward_sr_local_fp32.safetensors")
    T, H, W = fx["in.video_latent"].shape[2:]
    layout = SequenceLayout(1, T, H // 2, W // 2, fx["in.audio_latent"].shape[1], int(fx["in.text_len"]))
    assert torch.equal(layout.dense_mask(frame_window=1)[0, 0], fx["in.local_attn_mask"])


def test_rope_positions_match_released_coords(golden_dir):
    model = MagiHumanDiT(golden_tiny())
    load_official(model, golden_dir / "weights_tiny.safetensors")
    from magitrain.model import SequenceLayout

    for name, style in (("forward_base_v2_fp32", "v2"), ("forward_base_v1_fp32", "v1")):
        fx = load_file(golden_dir / f"{name}.safetensors")
        T, H, W = fx["in.video_latent"].shape[2:]
        layout = SequenceLayout(1, T, H // 2, W // 2, fx["in.audio_latent"].shape[1], int(fx["in.text_len"]))
        table = model.adapter.rope(layout.positions(style))[0]
        assert torch.allclose(table, fx["mid.adapter.rope"], atol=1e-6)
