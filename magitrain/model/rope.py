"""Partial 3-axis rotary position embedding (t, h, w) on the first 3/4 of each head's dims."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Holds `bands` = 1 / theta**(k / nb), k < nb = head_dim // 8 (released name `adapter.rope.bands`)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("bands", torch.empty(head_dim // 8))
        self.reset_bands()

    def _formula(self, device) -> Tensor:
        nb = self.head_dim // 8
        return 1.0 / self.theta ** (torch.arange(nb, dtype=torch.float32, device=device) / nb)

    @torch.no_grad()
    def reset_bands(self) -> None:
        self.bands.copy_(self._formula(self.bands.device))

    def forward(self, positions: Tensor) -> Tensor:
        """positions [B, S, 3] -> table [B, S, 6 nb] = cat(sin, cos) of angles laid out [t | h | w].

        A buffer cast to a low precision (DeepSpeed's bf16 mode casts the whole module) would move
        every position; the float32 frequencies are recomputed then, as the release keeps them.
        """
        bands = self.bands if self.bands.dtype == torch.float32 else self._formula(positions.device)
        angles = (positions.float()[..., :, None] * bands).flatten(-2)  # [B, S, 3 nb]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate-half RoPE in float32. x [B, S, H, d]; table [B, S, 6 nb]; dims past 6 nb pass through."""
    half = table.shape[-1] // 2  # 3 nb angles: pairs dim j with dim j + 3 nb
    sin, cos = table[..., None, :half], table[..., None, half:]
    x = x.float()
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
