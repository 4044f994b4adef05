"""FLOP accounting for throughput and MFU: `mfu = useful flops per second / peak`.

Counted as useful work, per sample:
- matmuls: `2 x active parameters` per REAL token (one modality copy in sandwich layers, about
  10.9B of the 15.3B at full size); text padding is not counted;
- attention: `4 x Hq x head_dim` per attended (query, key) pair (score and value products), with
  the pairs the mask allows: all real pairs in global layers, the frame window in local layers.
Training is 3x the forward (backward = 2x); recomputation under activation checkpointing is not
useful work and is not counted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MagiHumanConfig
from .layout import SequenceLayout


def _window_frames(frames: int, window: int) -> int:
    """Sum over video frames i of the frames j with |i - j| <= window."""
    return sum(min(frames - 1, i + window) - max(0, i - window) + 1 for i in range(frames))


def _text(layout: SequenceLayout) -> Tensor:
    """[B] real text + reference-audio tokens, float64, where the lengths live (no host sync)."""
    given = layout.text_len if layout.text_len is not None else layout.ref_len
    device = given.device if given is not None else None
    text, ref = layout.text_lengths(device), layout.ref_lengths(device)
    return text.to(torch.float64) + ref.to(torch.float64)


def attended_pairs(config: MagiHumanConfig, layout: SequenceLayout) -> tuple[Tensor, Tensor]:
    """([B] pairs of a global layer, [B] pairs of a local layer) over each sample's real tokens."""
    text = _text(layout)
    # real audio + reference + text tokens: they see, and are seen by, everyone
    others = layout.n_audio + text
    real = layout.n_video + others
    global_pairs = real * real
    per_frame = layout.grid_h * layout.grid_w
    video_video = per_frame * per_frame * _window_frames(layout.frames, config.frame_window)
    local_pairs = video_video + layout.n_video * others + others * real
    return global_pairs, local_pairs


def real_tokens(layout: SequenceLayout) -> Tensor:
    """Tokens of the batch that exist (text padding excluded), a float64 scalar tensor."""
    return (layout.n_video + layout.n_audio + _text(layout)).sum()


def forward_flops(config: MagiHumanConfig, layout: SequenceLayout) -> Tensor:
    """Useful FLOPs of one forward over the batch, a float64 scalar tensor on the lengths' device
    (nothing waits for the device; see the module docstring for what counts)."""
    real = layout.n_video + layout.n_audio + _text(layout)
    global_pairs, local_pairs = attended_pairs(config, layout)
    n_local = len(config.local_attn_layers)
    pairs = (config.num_layers - n_local) * global_pairs + n_local * local_pairs
    per_pair = 4.0 * config.num_heads_q * config.head_dim
    matmul = 2.0 * config.active_params_per_token() * real
    return (matmul + per_pair * pairs).sum()


def training_flops(config: MagiHumanConfig, layout: SequenceLayout) -> Tensor:
    """Forward + backward (2x forward)."""
    return 3.0 * forward_flops(config, layout)
