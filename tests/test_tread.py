"""TREAD token routing: the routed forward is the hand-built one, rate 0 changes nothing, gradients
reach every parameter, the throughput counts the FLOPs computed, compiles stay bounded."""

from __future__ import annotations

import pytest
import torch
from test_model_masks import dense_from_block_mask
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import create_block_mask

from magitrain.flow.tread import TreadConfig
from magitrain.model import MagiHumanDiT, SequenceLayout, magihuman_15b, tiny, tiny_sr1080
from magitrain.model.compile import compile_layers
from magitrain.model.dit import patchify
from magitrain.model.routing import TokenRoute, block_masks, dense_masks, token_facts


def _inputs(seed=0, B=2, text_len=(7, 3)):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 48, 3, 8, 12, generator=g)  # 3 frames of 4 x 6 patches: 72 video tokens
    audio = torch.randn(B, 9, 64, generator=g)
    text = torch.randn(B, max(text_len), 64, generator=g)
    return video, audio, text, torch.tensor(text_len)


def _route(start, end, B=2, n_video=72, n_audio=9, rate=0.5, audio=False, seed=1):
    gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    modalities = ("video", "audio") if audio else ("video",)
    cfg = TreadConfig(rate=rate, start_layer=start, end_layer=end, modalities=modalities)
    return cfg.draw(gens, {"video": n_video, "audio": n_audio}, 4, "cpu")


def _hand_built(model, video, audio, text, text_len, route):
    """Sample by sample: layers before `start` on every token, the kept tokens alone (their own rows
    of the whole sequence's RoPE table and dense mask) through start..end, put back in place."""
    cfg = model.config
    layout = SequenceLayout(video.shape[0], 3, 4, 6, audio.shape[1], text.shape[1], text_len)
    a = model.adapter
    tokens = (patchify(video, cfg.patch_size), audio, text)
    embedders = (a.video_embedder, a.audio_embedder, a.text_embedder)
    x = torch.cat([e(t) for e, t in zip(embedders, tokens, strict=True)], 1)
    rope = a.rope(layout.positions(cfg.coords_style))
    S = layout.seq_len
    window = cfg.frame_window if cfg.local_attn_layers else None
    masks = (layout.dense_mask(None), layout.dense_mask(window))
    full = [m if m is None else m.expand(-1, -1, S, S) for m in masks]
    kept_all, splits = route.kept(layout, "cpu")
    outs = []
    for b in range(layout.batch):
        xb, kept = x[b : b + 1], kept_all[b]
        masks = [m if m is None else m[b : b + 1] for m in full]
        for i, layer in enumerate(model.block.layers):
            if route.start <= i <= route.end:
                sub = [m if m is None else m[:, :, kept][:, :, :, kept] for m in masks]
                routed = layer(xb[:, kept], splits, rope[b : b + 1, kept], *sub)
                xb = xb.clone()
                xb[:, kept] = routed
            else:
                xb = layer(xb, layout.splits, rope[b : b + 1], *masks)
        outs.append(xb)
    x = torch.cat(outs)
    nv, na = layout.n_video, layout.n_audio
    return model.final_linear_video(model.final_norm_video(x[:, :nv])), model.final_linear_audio(
        model.final_norm_audio(x[:, nv : nv + na])
    )


@pytest.mark.parametrize("audio", [False, True])
def test_routed_forward_equals_the_hand_built_forward_of_the_kept_tokens(audio):
    """1080p-SR layout (frame-local attention, window 1), a padded prompt: the routed forward of
    the model equals the kept tokens run by hand through layers 1..2 with every other token unchanged."""
    torch.manual_seed(0)
    model = MagiHumanDiT(tiny_sr1080()).eval()
    video, audio_in, text, text_len = _inputs()
    route = _route(1, 2, audio=audio)
    with torch.no_grad():
        v, a = model(video, audio_in, text, text_len=text_len, route=route)
        want_v, want_a = _hand_built(model, video, audio_in, text, text_len, route)
        plain_v, _ = model(video, audio_in, text, text_len=text_len)
    from magitrain.model.dit import unpatchify

    torch.testing.assert_close(v, unpatchify(want_v, (3, 4, 6), (1, 2, 2)), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a, want_a, atol=2e-5, rtol=1e-5)
    assert (v - plain_v).abs().max() > 1e-3  # routing changes the output: the test can tell


def test_a_route_keeping_every_token_is_bit_identical_and_rate_0_draws_none():
    model = MagiHumanDiT(tiny_sr1080(activation_checkpointing=True))
    video, audio, text, text_len = _inputs()
    every = TokenRoute(1, 2, video=torch.arange(72).expand(2, 72))
    for route in (None, every):
        model.zero_grad()
        v, a = model(video, audio, text, text_len=text_len, route=route)
        (v.square().mean() + a.square().mean()).backward()
        got = (v, a, [p.grad.clone() for p in model.parameters()])
        if route is None:
            want = got
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(g, w) for g, w in zip(got[2], want[2], strict=True))
    assert TreadConfig(rate=0.0).draw([torch.Generator()], {"video": 72}, 4, "cpu") is None


def test_gradients_reach_every_parameter_with_routing_and_checkpointing():
    model = MagiHumanDiT(tiny(activation_checkpointing=True))
    video, audio, text, text_len = _inputs(seed=3)
    v, a = model(video, audio, text, text_len=text_len, route=_route(1, 2, audio=True))
    (v.square().mean() + a.square().mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_the_kept_tokens_block_masks_equal_their_dense_masks():
    """Several 128-token blocks, per-sample kept frames, padded prompts, windows 1 and none."""
    layout = SequenceLayout(2, 16, 8, 8, 33, 20, torch.tensor([20, 5]))  # ~4 frames a block
    gens = [torch.Generator().manual_seed(b) for b in range(2)]
    route = TreadConfig(rate=0.5, start_layer=1, end_layer=2).draw(gens, {"video": 1024}, 4, "cpu")
    kept, _ = route.kept(layout, "cpu")
    facts = token_facts(layout, kept)
    K = kept.shape[1]
    for window in (None, 1):
        for got, want in zip(block_masks(*facts, window), dense_masks(*facts, window), strict=True):
            if want is None:
                assert got is None
                continue
            assert torch.equal(dense_from_block_mask(got, K), want.expand(2, 1, K, K)[:, 0])
            # the same full / partial blocks as create_block_mask's evaluation of every pair
            reference = create_block_mask(got.mask_mod, 2, None, K, K, device="cpu")
            for name in ("kv_num_blocks", "full_kv_num_blocks"):
                assert torch.equal(getattr(reference, name), getattr(got, name)), name


def test_the_routed_forward_with_flex_block_masks_equals_the_dense_one():
    torch.manual_seed(0)
    dense = MagiHumanDiT(tiny_sr1080(attn_backend="sdpa")).eval()
    flex = MagiHumanDiT(tiny_sr1080(attn_backend="flex")).eval()
    flex.load_state_dict(dense.state_dict())
    video, audio, text, text_len = _inputs()
    route = _route(1, 2, audio=True)
    with torch.no_grad():  # (flex attention has no CPU backward)
        got = flex(video, audio, text, text_len=text_len, route=route)
        want = dense(video, audio, text, text_len=text_len, route=route)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_routing_layers_default_to_the_released_span_and_bad_spans_name_the_keys():
    assert TreadConfig(rate=0.5).layers(magihuman_15b().num_layers) == (2, 25)
    assert TreadConfig(rate=0.5).layers(4) == (1, 2)
    with pytest.raises(ValueError, match="module.tread.start_layer / end_layer"):
        TreadConfig(rate=0.5, start_layer=2, end_layer=25).layers(4)
    with pytest.raises(ValueError, match="module.tread.modalities"):
        TreadConfig(modalities=("text",))
    assert TreadConfig(rate=0.5).kept(72) == 36 and TreadConfig(rate=0.3).kept(9) == 6


def test_compiled_layers_with_routing_compile_a_bounded_number_of_times():
    counter = CompileCounter()
    model = compile_layers(MagiHumanDiT(tiny(local_attn_layers=(1, 2))), counter)
    for seed in range(4):  # new draws, the same kept count: no new graph
        video, audio, text, text_len = _inputs(seed=seed, text_len=(7, 7))
        with torch.no_grad():
            model(video, audio, text, route=_route(1, 2, seed=10 * seed))
    assert counter.frame_count <= 3 * 2


def test_flops_count_the_kept_tokens_and_their_allowed_pairs_in_the_routed_layers():
    """Every layer counted by hand from the whole sequence's dense mask (rows and columns of the
    kept tokens inside the span), with padded prompts and frame-local layers 1, 2."""
    from magitrain.model.flops import forward_flops, set_aside_tokens

    config = tiny(local_attn_layers=(1, 2), frame_window=1)
    layout = SequenceLayout(2, 5, 2, 3, 9, 7, torch.tensor([7, 3]))
    gens = [torch.Generator().manual_seed(b) for b in range(2)]
    route = TreadConfig(rate=0.5, start_layer=2, end_layer=3, modalities=("video", "audio")).draw(
        gens, {"video": 30, "audio": 9}, 4, "cpu"
    )
    kept, _ = route.kept(layout, "cpu")
    real = layout.key_is_real()
    S = layout.seq_len
    per_pair = 4 * config.num_heads_q * config.head_dim
    d = config.hidden_size
    expected = 2 * (d * 192 + d * 192) * real.sum().double()  # embedders and output heads
    for i in range(4):
        mask = layout.dense_mask(1 if i in config.local_attn_layers else None).expand(2, 1, S, S)[:, 0]
        mask = mask & real[:, :, None]  # padded queries do no useful work
        if 2 <= i <= 3:
            mask = torch.stack([mask[b][kept[b]][:, kept[b]] for b in range(2)])
            tokens = torch.gather(real, 1, kept).sum()
        else:
            tokens = real.sum()
        expected += 2 * config.layer_params_per_token(i) * tokens.double() + per_pair * mask.sum().double()
    got = forward_flops(config, layout, route)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    assert float(got) < float(forward_flops(config, layout))
    assert set_aside_tokens(layout, route) == 2 * (15 + 4)
