"""MagiHumanDiT: released layout at 15B, batching and padding, sandwich routing, checkpointing, compile."""

from __future__ import annotations

import pytest
import torch

from magitrain.model import MagiHumanDiT, SequenceLayout, count_parameters, magihuman_15b, tiny


def released_15b_shapes() -> dict[str, tuple[int, ...]]:
    """The released checkpoint's tensor names and shapes, written out from REFERENCE.md §1."""
    d, qkv, hd = 5120, 7208, 128
    shapes = {
        "adapter.video_embedder.weight": (d, 192),
        "adapter.video_embedder.bias": (d,),
        "adapter.audio_embedder.weight": (d, 64),
        "adapter.audio_embedder.bias": (d,),
        "adapter.text_embedder.weight": (d, 3584),
        "adapter.text_embedder.bias": (d,),
        "adapter.rope.bands": (16,),
        "final_norm_video.weight": (d,),
        "final_norm_audio.weight": (d,),
        "final_linear_video.weight": (192, d),
        "final_linear_audio.weight": (64, d),
    }
    for i in range(40):
        c = 3 if i in (0, 1, 2, 3, 36, 37, 38, 39) else 1
        up, down = ((20480, d), (d, 20480)) if i < 4 else ((27304, d), (d, 13652))
        p = f"block.layers.{i}."
        shapes |= {
            p + "attention.pre_norm.weight": (c * d,),
            p + "attention.linear_qkv.weight": (c * qkv, d),
            p + "attention.linear_proj.weight": (c * d, d),
            p + "attention.q_norm.weight": (c * hd,),
            p + "attention.k_norm.weight": (c * hd,),
            p + "mlp.pre_norm.weight": (c * d,),
            p + "mlp.up_gate_proj.weight": (c * up[0], up[1]),
            p + "mlp.down_proj.weight": (c * down[0], down[1]),
        }
    return shapes


def test_15b_preset_has_the_released_names_and_shapes():
    with torch.device("meta"):
        model = MagiHumanDiT(magihuman_15b())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == released_15b_shapes()
    assert len(got) == 331
    assert abs(count_parameters(model) / 1e9 - 15.30) < 0.01
    assert abs(model.config.active_params_per_token() / 1e9 - 10.9) < 0.05


def _inputs(batch=2, T=3, H=4, W=6, n_audio=9, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 48, T, H, W, generator=g),
        torch.randn(batch, n_audio, 64, generator=g),
        torch.randn(batch, L, 64, generator=g),
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    # non-zero norm offsets so every weight matters
    m = MagiHumanDiT(tiny(local_attn_layers=(1, 2), frame_window=1))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    return m.eval()


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_batch_with_different_text_lengths_equals_samples_alone(model, style):
    video, audio, text = _inputs()
    text_len = torch.tensor([6, 3])
    with torch.no_grad():
        bv, ba = model(video, audio, text, text_len, coords_style=style)
        for i in range(2):
            n = int(text_len[i])
            sv, sa = model(video[i : i + 1], audio[i : i + 1], text[i : i + 1, :n], coords_style=style)
            torch.testing.assert_close(bv[i : i + 1], sv, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ba[i : i + 1], sa, atol=2e-5, rtol=1e-5)


def test_padded_text_changes_no_output(model):
    video, audio, text = _inputs(batch=1, L=4)
    padded = torch.cat([text, 100 * torch.randn(1, 5, 64)], dim=1)
    with torch.no_grad():
        ref = model(video, audio, text)
        out = model(video, audio, padded, text_len=torch.tensor([4]))
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_sandwich_text_copy_reaches_video_only_through_attention(model):
    """Perturbing the text copy of a sandwich layer changes nothing when no text token is present."""
    video, audio, text = _inputs(batch=1)
    no_text = text[:, :0]
    with torch.no_grad():
        before_empty, before_text = model(video, audio, no_text), model(video, audio, text)
        layer = model.block.layers[0]
        for p in (
            layer.attention.linear_qkv.weight,
            layer.mlp.up_gate_proj.weight,
            layer.mlp.pre_norm.weight,
        ):
            p.chunk(3)[2].add_(0.5 * torch.randn_like(p.chunk(3)[2]))
        after_empty, after_text = model(video, audio, no_text), model(video, audio, text)
    assert torch.equal(before_empty[0], after_empty[0]) and torch.equal(before_empty[1], after_empty[1])
    assert (before_text[0] - after_text[0]).abs().max() > 1e-3


def test_each_modality_uses_its_own_copy(model):
    """Each modality reads its own copy: the video copy of layer 0's MLP only touches video rows."""
    video, audio, text = _inputs(batch=1)
    layer = model.block.layers[0]
    with torch.no_grad():
        x = torch.randn(1, 24 + 9 + 6, model.config.hidden_size)
        before = layer.mlp(x, (24, 9, 6))
        layer.mlp.down_proj.weight.chunk(3)[0].mul_(2.0)
        after = layer.mlp(x, (24, 9, 6))
    assert not torch.equal(before[:, :24], after[:, :24])
    assert torch.equal(before[:, 24:], after[:, 24:])


def test_activation_checkpointing_gives_the_same_gradients(model):
    video, audio, text = _inputs()
    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        v, a = model(video, audio, text, torch.tensor([6, 2]))
        (v.square().mean() + a.square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_block_compiles_with_fullgraph(model):
    """No graph breaks in a block (local attention, sandwich routing, padding mask), forward and backward."""
    torch._dynamo.reset()
    layout = SequenceLayout(2, 3, 2, 3, 9, 5, torch.tensor([5, 3]))
    rope = model.adapter.rope(layout.positions("v2"))
    x = torch.randn(2, layout.seq_len, model.config.hidden_size, requires_grad=True)
    masks = (layout.dense_mask(None), layout.dense_mask(1))
    for index in (0, 1):  # a sandwich layer and a local-attention shared layer
        layer = model.block.layers[index]
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x, layout.splits, rope, *masks)
            ref = layer(x, layout.splits, rope, *masks)
        torch.testing.assert_close(out, ref)
        out.sum().backward()


def test_flex_block_mask_matches_dense_mask(model):
    from magitrain.model import attention

    layout = SequenceLayout(2, 3, 2, 3, 9, 5, torch.tensor([5, 3]))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, layout.seq_len, 16, generator=g)
    k, v = (torch.randn(2, 2, layout.seq_len, 16, generator=g) for _ in range(2))
    for window in (None, 1):
        dense = attention(q, k, v, layout.dense_mask(window), backend="sdpa")
        flex = attention(q, k, v, layout.block_mask(window), backend="flex")
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_with_specific_errors(model):
    video, audio, text = _inputs()
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(video[..., :3], audio, text)
    with pytest.raises(ValueError, match=r"video must be \[B, 48"):
        model(video[:, :47], audio, text)
    with pytest.raises(ValueError, match="audio must be"):
        model(video, audio[..., :32], text)
    with pytest.raises(ValueError, match="text_len must be"):
        model(video, audio, text, text_len=torch.tensor([3]))
    with pytest.raises(ValueError, match="coords_style"):
        model(video, audio, text, coords_style="v3")


def test_config_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="num_heads_q"):
        tiny(num_heads_q=3)
    with pytest.raises(ValueError, match="sandwich_layers"):
        tiny(sandwich_layers=(0, 9))


def test_flop_accounting_matches_the_reports_floor_arithmetic():
    """REFERENCE §4: 8 steps x 2 x 10.9e9 x ~3.8k tokens ~ 6.6e14 FLOPs, plus ~1e14 for attention."""
    from magitrain.model import SequenceLayout
    from magitrain.model.flops import forward_flops, real_tokens

    config = magihuman_15b()
    layout = SequenceLayout(1, 32, 8, 14, 126, 100)  # 256p 5 s: 3584 video tokens
    assert float(real_tokens(layout)) == 3584 + 126 + 100
    total = 8 * float(forward_flops(config, layout))
    matmul = 8 * 2 * config.active_params_per_token() * (3584 + 126 + 100)
    assert 6.5e14 < matmul < 6.8e14
    assert 0.8e14 < total - matmul < 1.2e14


@pytest.mark.parametrize("window", [None, 1])
def test_flops_count_real_tokens_and_the_pairs_the_mask_allows(window):
    """A known shape: padded text is no work, local layers count the pairs the dense mask allows."""
    from magitrain.model import SequenceLayout
    from magitrain.model.flops import forward_flops, training_flops

    local = () if window is None else (1, 2)
    config = tiny(local_attn_layers=local, frame_window=window or 11)
    layout = SequenceLayout(2, 5, 2, 3, 9, 7, torch.tensor([7, 3]))
    real = torch.tensor([30 + 9 + 7, 30 + 9 + 3], dtype=torch.float64)
    real_queries = layout.key_is_real()[:, None, :, None]  # padded queries do no useful work either

    def pairs(w):
        return (layout.dense_mask(w) & real_queries).sum((1, 2, 3)).double()

    global_pairs, local_pairs = pairs(None), pairs(window) if local else 0
    attention = 4 * 4 * 16 * ((4 - len(local)) * global_pairs + len(local) * local_pairs)
    expected = (2 * config.active_params_per_token() * real + attention).sum()
    assert float(forward_flops(config, layout)) == pytest.approx(float(expected), rel=1e-12)
    assert float(training_flops(config, layout)) == pytest.approx(3 * float(expected), rel=1e-12)
    # MFU at a known speed: this batch 10 times a second on a 1 TFLOP/s device
    assert 10 * float(training_flops(config, layout)) / 1e12 == pytest.approx(30 * float(expected) / 1e12)
