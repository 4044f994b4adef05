"""The contract between samplers and the transformer."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

# velocity_fn(video [B, 48, T, H, W], audio [B, N, 64], text [B, L, C], text_len [B] or None)
#   -> (v_video, v_audio), the flow velocities `eps - x0` in float32, same shapes as the inputs.
# `MagiHumanDiT` itself fits; pass `functools.partial(model, coords_style="v1")` to force SR text
# positions, and wrap the call in `torch.autocast` for bf16 numerics.
VelocityFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
