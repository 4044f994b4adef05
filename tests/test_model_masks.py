"""Attention masks at the real 1080p size and bounded compiles of flex attention and the layers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from magitrain.model import MagiHumanDiT, SequenceLayout, attention, tiny
from magitrain.model.compile import compile_fn, compile_layers
from magitrain.model.layout import BLOCK_SIZE, _block_stats

LAYOUTS = [  # (batch, frames, grid_h, grid_w, audio, text slots, text_len)
    (2, 5, 4, 6, 17, 9, [9, 4]),
    (3, 7, 6, 10, 29, 40, [40, 0, 13]),  # a dropped prompt (no text at all)
    (1, 9, 8, 8, 33, 20, None),
    (1, 16, 4, 8, 61, 30, [30]),  # frames of 32 tokens: blocks of 4 frames, S not a block multiple
    # with reference audio: (..., text_len, reference slots, reference lengths)
    (3, 7, 6, 10, 29, 40, [40, 0, 13], 250, [250, 0, 30]),  # a dropped reference: a hole of 2 blocks
    (2, 5, 4, 6, 17, 9, None, 26, [26, 25]),
    (1, 9, 8, 8, 33, 20, None, 100, None),
]


def dense_from_block_mask(block_mask, seq_len: int) -> torch.Tensor:
    """[B, S, S] bool: full blocks are True, partial blocks evaluate the mask_mod, others False."""
    B, _, n = block_mask.kv_num_blocks.shape
    out = torch.zeros(B, seq_len, seq_len, dtype=torch.bool)
    idx = torch.arange(seq_len)
    for b in range(B):
        for qb in range(n):
            qs = idx[qb * BLOCK_SIZE : (qb + 1) * BLOCK_SIZE]
            for full, num, kv in (
                (False, block_mask.kv_num_blocks, block_mask.kv_indices),
                (True, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
            ):
                for kb in kv[b, 0, qb, : int(num[b, 0, qb])].tolist():
                    ks = idx[kb * BLOCK_SIZE : (kb + 1) * BLOCK_SIZE]
                    rows, cols = qs[:, None], ks[None, :]
                    value = True if full else block_mask.mask_mod(torch.tensor(b), 0, rows, cols)
                    out[b, qs[0] : qs[-1] + 1, ks[0] : ks[-1] + 1] = value
    return out


@pytest.mark.parametrize("window", [None, 1, 2])
@pytest.mark.parametrize("shape", LAYOUTS)
def test_block_mask_equals_the_dense_mask(shape, window):
    *dims, text_len = shape[:7]
    n_ref, ref_len = shape[7:] or (0, None)
    tensor = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    layout = SequenceLayout(*dims, tensor(text_len), n_ref, tensor(ref_len))
    block_mask, dense = layout.block_mask(window), layout.dense_mask(window)
    if dense is None:
        assert block_mask is None
        return
    S = layout.seq_len
    assert torch.equal(dense_from_block_mask(block_mask, S), dense.expand(layout.batch, 1, S, S)[:, 0])
    # the same full / partial blocks as create_block_mask's evaluation of every pair
    reference = create_block_mask(block_mask.mask_mod, layout.batch, None, S, S, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(reference, name), getattr(block_mask, name)), name
    # and flex attention with it computes what SDPA does with the dense mask
    g = torch.Generator().manual_seed(0)
    q = torch.randn(layout.batch, 4, S, 16, generator=g)
    k, v = (torch.randn(layout.batch, 2, S, 16, generator=g) for _ in "kv")
    torch.testing.assert_close(
        attention(q, k, v, block_mask, "flex"), attention(q, k, v, dense, "sdpa"), atol=1e-5, rtol=1e-5
    )


def test_block_mask_statistics_are_cached_per_shape():
    layout = SequenceLayout(2, 5, 4, 6, 17, 9, torch.tensor([9, 4]))
    layout.block_mask(1)
    hits = _block_stats.cache_info().hits
    SequenceLayout(2, 5, 4, 6, 17, 9, torch.tensor([3, 9])).block_mask(1)  # other lengths, same shape
    assert _block_stats.cache_info().hits == hits + 1


MEMORY_PROBE = """
import resource, torch
from magitrain.inference import ClipShape
from magitrain.model import SequenceLayout
clip = ClipShape.of(5, "1080p")
T, H, W = clip.latent_size
layout = SequenceLayout(2, T, H // 2, W // 2, clip.audio_tokens, 640, torch.tensor([640, 77]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
masks = [layout.block_mask(11), layout.block_mask(None)]
print(layout.seq_len, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_1080p_block_mask_is_built_without_an_s_by_s_tensor():
    """The real 1080p SR sequence (65,280 video tokens): a dense mask would need > 8 GB."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seq_len, grown = (int(x) for x in proc.stdout.split()[-2:])
    assert seq_len == 65280 + 126 + 640
    assert grown < 2**30  # peak resident memory growth while building both masks


def test_flex_attention_compiles_a_bounded_number_of_times():
    counter = CompileCounter()
    flex = compile_fn(flex_attention, backend=counter)
    for n_text in (5, 9, 17, 30, 44):  # every padded prompt length is a new sequence length
        layout = SequenceLayout(2, 3, 2, 3, 9, n_text, torch.tensor([n_text, 2]))
        q, k = torch.randn(2, 4, layout.seq_len, 16), torch.randn(2, 2, layout.seq_len, 16)
        flex(q, k, k, block_mask=layout.block_mask(1), enable_gqa=True)
    assert counter.frame_count <= 2


def test_compiled_layers_compile_a_bounded_number_of_times():
    """Three layer kinds (sandwich gelu7, shared local swiglu7, sandwich swiglu7): at most 2 each."""
    counter = CompileCounter()
    model = compile_layers(MagiHumanDiT(tiny(local_attn_layers=(1, 2), attn_backend="flex")), counter)
    for n_text in (5, 9, 17, 30):
        with torch.no_grad():  # (flex attention has no CPU backward)
            model(torch.randn(2, 48, 3, 4, 6), torch.randn(2, 9, 64), torch.randn(2, n_text, 64),
                  text_len=torch.tensor([n_text, 2]))  # fmt: skip
    assert counter.frame_count <= 3 * 2
    assert torch._dynamo.config.recompile_limit >= 3 * 2
