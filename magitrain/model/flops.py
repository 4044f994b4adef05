"""FLOP accounting for throughput and MFU: `mfu = flops_per_token * tokens_per_s / peak`.

Matmul FLOPs use the ACTIVE parameters of a token (one modality copy in sandwich layers, about
10.9B of the 15.3B at full size); attention adds `4 * S * Hq * d` per token and layer for the
score and value products. Local-attention layers are counted as dense (an upper bound).
"""

from __future__ import annotations

from .config import MagiHumanConfig


def forward_flops_per_token(config: MagiHumanConfig, seq_len: int) -> float:
    matmul = 2.0 * config.active_params_per_token()
    attention = 4.0 * seq_len * config.num_heads_q * config.head_dim * config.num_layers
    return matmul + attention


def training_flops_per_token(config: MagiHumanConfig, seq_len: int) -> float:
    """Forward + backward (2x forward); recomputation under activation checkpointing is not useful work."""
    return 3.0 * forward_flops_per_token(config, seq_len)
