"""FLOP accounting for throughput and MFU: `mfu = useful flops per second / peak`.

Counted as useful work, per sample:
- matmuls: `2 x active parameters` per REAL token (one modality copy in sandwich layers, about
  10.9B of the 15.3B at full size); text padding is not counted;
- attention: `4 x Hq x head_dim` per attended (query, key) pair (score and value products), with
  the pairs the mask allows: all real pairs in global layers, the frame window in local layers.
Training is 3x the forward (backward = 2x); recomputation under activation checkpointing is not
useful work and is not counted. With token routing (TREAD), the layers a route spans count only
the tokens they compute: the kept ones, and the pairs among them the mask allows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MagiHumanConfig
from .layout import SequenceLayout
from .routing import TokenRoute


def _text(layout: SequenceLayout) -> Tensor:
    """[B] real text + reference-audio tokens, float64, where the lengths live (no host sync)."""
    given = layout.text_len if layout.text_len is not None else layout.ref_len
    device = given.device if given is not None else None
    text, ref = layout.text_lengths(device), layout.ref_lengths(device)
    return text.to(torch.float64) + ref.to(torch.float64)


def attended_pairs(config: MagiHumanConfig, layout: SequenceLayout) -> tuple[Tensor, Tensor]:
    """([B] pairs of a global layer, [B] pairs of a local layer) over each sample's real tokens."""
    text = _text(layout)
    per_frame = torch.full((layout.batch, layout.frames), float(layout.grid_h * layout.grid_w))
    return _pairs(config, per_frame.to(text), layout.n_audio + text)


def _pairs(config: MagiHumanConfig, frame_counts: Tensor, others: Tensor) -> tuple[Tensor, Tensor]:
    """(global, local) attended pairs [B] of samples with `frame_counts` [B, T] video tokens per
    latent frame and `others` [B] real audio + reference + text tokens (they see, and are seen by,
    everyone)."""
    frames = torch.arange(frame_counts.shape[1], device=frame_counts.device)
    band = ((frames[:, None] - frames[None, :]).abs() <= config.frame_window).to(frame_counts)
    video_video = ((frame_counts @ band) * frame_counts).sum(1)
    n_video = frame_counts.sum(1)
    real = n_video + others
    return real * real, video_video + n_video * others + others * real


def _kept_counts(layout: SequenceLayout, route: TokenRoute, like: Tensor) -> tuple[Tensor, Tensor]:
    """([B, T] kept video tokens per latent frame, [B] kept audio + real reference and text tokens)
    of a route."""
    per_frame = layout.grid_h * layout.grid_w
    counts = torch.full((layout.batch, layout.frames), float(per_frame), dtype=like.dtype, device=like.device)
    if route.video is not None:
        frame = (route.video.to(like.device) // per_frame).long()
        counts = torch.zeros_like(counts).scatter_add_(1, frame, torch.ones_like(frame, dtype=like.dtype))
    audio = layout.n_audio if route.audio is None else route.audio.shape[1]
    return counts, audio + like


def real_tokens(layout: SequenceLayout) -> Tensor:
    """Tokens of the batch that exist (text padding excluded), a float64 scalar tensor."""
    return (layout.n_video + layout.n_audio + _text(layout)).sum()


def forward_flops(config: MagiHumanConfig, layout: SequenceLayout, route: TokenRoute | None = None) -> Tensor:
    """Useful FLOPs of one forward over the batch, a float64 scalar tensor on the lengths' device
    (nothing waits for the device; see the module docstring for what counts). With `route`, the
    layers it spans count the kept tokens only."""
    text = _text(layout)
    real = layout.n_video + layout.n_audio + text
    global_pairs, local_pairs = attended_pairs(config, layout)
    per_pair = 4.0 * config.num_heads_q * config.head_dim
    if route is None:
        n_local = len(config.local_attn_layers)
        pairs = (config.num_layers - n_local) * global_pairs + n_local * local_pairs
        matmul = 2.0 * config.active_params_per_token() * real
        return (matmul + per_pair * pairs).sum()
    frame_counts, others = _kept_counts(layout, route, text)
    kept = (frame_counts.sum(1) + others, *_pairs(config, frame_counts, others))
    total = 2.0 * (config.active_params_per_token() - _layer_params(config)) * real  # embedders, heads
    for i in range(config.num_layers):
        tokens, g, loc = kept if route.start <= i <= route.end else (real, global_pairs, local_pairs)
        pairs = loc if i in config.local_attn_layers else g
        total = total + 2.0 * config.layer_params_per_token(i) * tokens + per_pair * pairs
    return total.sum()


def _layer_params(config: MagiHumanConfig) -> int:
    return sum(config.layer_params_per_token(i) for i in range(config.num_layers))


def set_aside_tokens(layout: SequenceLayout, route: TokenRoute | None) -> int:
    """Tokens of the batch a route sets aside (0 without one): a count of its shape, no device wait."""
    if route is None:
        return 0
    video = 0 if route.video is None else layout.n_video - route.video.shape[1]
    audio = 0 if route.audio is None else layout.n_audio - route.audio.shape[1]
    return layout.batch * (video + audio)


def training_flops(config: MagiHumanConfig, layout: SequenceLayout, route: TokenRoute | None = None):
    """Forward + backward (2x forward)."""
    return 3.0 * forward_flops(config, layout, route)
