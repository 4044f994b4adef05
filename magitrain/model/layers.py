"""Transformer layers of MagiHuman: modality-routed linears and norms, attention, gelu7/swiglu7 MLPs.

A "sandwich" layer stores three copies of every weight stacked along dim 0 (video, audio, text).
The sequence is sorted by modality, so each copy is one dense matmul over a contiguous slice of
the sequence (`splits` = token counts of video, audio, text). A shared layer has one copy.

Precision follows the released model: linears and attention in bf16; the residual stream, norms,
RoPE, gates and activations in float32. The block linears reach bf16 either through autocast or
through bf16 weights (released storage, FSDP2's gathered parameters, DeepSpeed's bf16 module):
without autocast a linear casts its float32 input to its weight's dtype, and everything after it
that the release keeps in float32 upcasts again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .config import MagiHumanConfig
from .rope import apply_rope

Splits = tuple[int, int, int]


def per_modality(x: Tensor, splits: Splits, copies: int, fn) -> Tensor:
    """`fn(segment, copy)` on each modality's slice of dim 1, or once on all of x when shared."""
    if copies == 1:
        return fn(x, 0)
    return torch.cat([fn(part, i) for i, part in enumerate(x.split(splits, dim=1))], dim=1)


class ModalityLinear(nn.Linear):
    """Bias-free linear with `copies` stacked weights: weight [copies * out, in]."""

    def __init__(self, in_features: int, out_features: int, copies: int = 1):
        super().__init__(in_features, copies * out_features, bias=False)
        self.copies = copies

    def forward(self, x: Tensor, splits: Splits) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):  # bf16 weights: a bf16 matmul, as released
            x = x.to(self.weight.dtype)
        weights = self.weight.chunk(self.copies)
        return per_modality(x, splits, self.copies, lambda part, i: F.linear(part, weights[i]))


class Float32Linear(nn.Linear):
    """The release's float32 linears (input embedders, output heads): float32 whatever the weights'
    storage dtype (DeepSpeed's bf16 mode casts them) and whether autocast is on."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class RMSNorm(nn.Module):
    """RMSNorm in float32 with the weight stored as an offset: `x_hat * (1 + w)`, w initialised to 0."""

    def __init__(self, dim: int, copies: int = 1, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(copies * dim))
        self.copies, self.eps = copies, eps

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + weight.float())

    def forward(self, x: Tensor, splits: Splits | None = None) -> Tensor:
        if self.copies == 1:
            return self._norm(x, self.weight)
        weights = self.weight.chunk(self.copies)
        return per_modality(x, splits, self.copies, lambda part, i: self._norm(part, weights[i]))


def gelu7(h: Tensor) -> Tensor:
    c = h.clamp(max=7.0)
    return c * torch.sigmoid(1.702 * c)


def swiglu7(h: Tensor) -> Tensor:
    """Up-projection rows are interleaved: even rows are the gate (glu), odd rows the linear half."""
    glu = h[..., ::2].clamp(max=7.0)
    lin = h[..., 1::2].clamp(-7.0, 7.0)
    return glu * torch.sigmoid(1.702 * glu) * (lin + 1.0)


class Attention(nn.Module):
    """GQA self-attention with QK-norm, RoPE and an input-dependent per-head sigmoid gate."""

    def __init__(self, cfg: MagiHumanConfig, copies: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_q, self.n_kv, self.head_dim = cfg.num_heads_q, cfg.num_heads_kv, hd
        self.gating, self.backend = cfg.attn_gating, cfg.attn_backend
        self.pre_norm = RMSNorm(d, copies, cfg.norm_eps)
        self.linear_qkv = ModalityLinear(d, cfg.qkv_rows, copies)  # rows: q | k | v | gate
        self.linear_proj = ModalityLinear(self.n_q * hd, d, copies)
        self.q_norm = RMSNorm(hd, copies, cfg.norm_eps)
        self.k_norm = RMSNorm(hd, copies, cfg.norm_eps)
        self.context_parallel = None  # magitrain.parallel.context_parallel sets it: Ulysses all-to-all

    def forward(self, x: Tensor, splits: Splits, rope: Tensor, mask) -> Tensor:
        B, S, _ = x.shape
        hd = self.head_dim
        qkv = self.linear_qkv(self.pre_norm(x, splits), splits)
        q, k, v, gate = qkv.split(
            [self.n_q * hd, self.n_kv * hd, self.n_kv * hd, qkv.shape[-1] - (self.n_q + 2 * self.n_kv) * hd],
            dim=-1,
        )
        q = apply_rope(self.q_norm(q.view(B, S, self.n_q, hd), splits), rope)  # [B, S, Hq, d] f32
        k = apply_rope(self.k_norm(k.view(B, S, self.n_kv, hd), splits), rope)
        v = v.view(B, S, self.n_kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cp = self.context_parallel
        if cp is not None:  # this rank's tokens of all heads -> all tokens of this rank's heads
            q, k, v = cp.seq_to_heads(q), cp.seq_to_heads(k), cp.seq_to_heads(v)
        o = attention(q, k, v, mask, self.backend)
        if cp is not None:
            o = cp.heads_to_seq(o)
        o = o.transpose(1, 2)  # [B, S, Hq, d]
        if self.gating:
            o = o.float() * torch.sigmoid(gate.float())[..., None]
        return self.linear_proj(o.reshape(B, S, self.n_q * hd), splits)


class MLP(nn.Module):
    def __init__(self, cfg: MagiHumanConfig, copies: int, gelu: bool):
        super().__init__()
        hidden = cfg.gelu_hidden if gelu else cfg.swiglu_hidden
        self.act = gelu7 if gelu else swiglu7
        self.pre_norm = RMSNorm(cfg.hidden_size, copies, cfg.norm_eps)
        self.up_gate_proj = ModalityLinear(cfg.hidden_size, hidden if gelu else 2 * hidden, copies)
        self.down_proj = ModalityLinear(hidden, cfg.hidden_size, copies)

    def forward(self, x: Tensor, splits: Splits) -> Tensor:
        h = self.up_gate_proj(self.pre_norm(x, splits), splits)
        return self.down_proj(self.act(h.float()), splits)


class TransformerLayer(nn.Module):
    """Pre-norm residual block: `x = x + attn(x); x = x + mlp(x)`; x is the float32 residual stream."""

    def __init__(self, cfg: MagiHumanConfig, index: int):
        super().__init__()
        copies = 3 if index in cfg.sandwich_layers else 1
        self.local = index in cfg.local_attn_layers
        self.attention = Attention(cfg, copies)
        self.mlp = MLP(cfg, copies, gelu=index in cfg.gelu7_layers)

    def forward(self, x: Tensor, splits: Splits, rope: Tensor, global_mask, local_mask) -> Tensor:
        x = x + self.attention(x, splits, rope, local_mask if self.local else global_mask)
        return x + self.mlp(x, splits)
