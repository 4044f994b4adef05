"""Token routing (TREAD): a subset of the tokens runs layers `start..end`, the rest skip them.

The tokens set aside after layer `start - 1` wait unchanged and are put back in place before
layer `end + 1` (Krause et al., "TREAD", 2025; the released config's `tread_config`). The kept
tokens are gathered out of the whole sequence, so each keeps what it had there: its RoPE
coordinates (the table is computed for the whole sequence, then gathered), its modality (the kept
indices are ascending, so the kept sequence is still `[video | audio | reference | text]` with
smaller splits; reference audio and text are never routed), its padding flag and its video frame
for the 1080p local window. The masks of the kept tokens are built here from those per-token facts
of the one `SequenceLayout`.

The model draws nothing: which tokens stay is a `TokenRoute` the training side passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import BLOCK_SIZE, SequenceLayout, _indices

ROUTABLE = ("video", "audio")  # text never: it is the condition every token reads (docs/training.md)


@dataclass(frozen=True)
class TokenRoute:
    """Which tokens run layers `start..end` (inclusive): per routed modality, each sample's kept
    token indices inside that modality's segment, [B, k] ascending, the same k for every sample
    (a fixed kept count per bucket keeps compiled shapes bounded). None: all of that modality."""

    start: int
    end: int
    video: Tensor | None = None
    audio: Tensor | None = None

    def check(self, num_layers: int, layout: SequenceLayout) -> None:
        if not 0 <= self.start <= self.end < num_layers:
            raise ValueError(
                f"token route layers {self.start}..{self.end} must satisfy 0 <= start <= end < {num_layers}"
            )
        for name, n in (("video", layout.n_video), ("audio", layout.n_audio)):
            idx = getattr(self, name)
            if idx is not None and (idx.ndim != 2 or idx.shape[0] != layout.batch or idx.shape[1] > n):
                raise ValueError(
                    f"token route {name} indices must be [{layout.batch}, k <= {n}], got {tuple(idx.shape)}"
                )

    def kept(self, layout: SequenceLayout, device) -> tuple[Tensor, tuple[int, int, int]]:
        """([B, K] ascending sequence indices of the kept tokens, their (video, audio, text) counts)."""
        B, nv, na = layout.batch, layout.n_video, layout.n_audio
        parts, offset = [], 0
        for idx, n in ((self.video, nv), (self.audio, na), (None, layout.n_ref), (None, layout.n_text)):
            idx = torch.arange(n, device=device).expand(B, n) if idx is None else idx.to(device)
            parts.append(idx + offset)
            offset += n
        video, audio, ref, text = (p.shape[1] for p in parts)
        return torch.cat(parts, dim=1), (video, audio + ref, text)  # reference audio is audio


def gather_tokens(x: Tensor, kept: Tensor) -> Tensor:
    """[B, S, *] -> [B, K, *]: the kept tokens' rows."""
    index = kept.reshape(*kept.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def put_back(held: Tensor, kept: Tensor, routed: Tensor) -> Tensor:
    """The whole sequence `held` [B, S, D] with the kept tokens' rows replaced by `routed` [B, K, D]."""
    index = kept[..., None].expand(-1, -1, held.shape[-1])
    return held.scatter(1, index, routed)


def token_facts(layout: SequenceLayout, kept: Tensor) -> tuple[Tensor, Tensor | None]:
    """([B, K] latent frame of each kept token, -1 off video; [B, K] real or None if none is padding)."""
    device = kept.device
    frame = layout.video_frame_of_token(device)[kept]
    real = layout.key_is_real(device)
    return frame, None if real is None else torch.gather(real, 1, kept)


def dense_masks(frame: Tensor, real: Tensor | None, window: int | None):
    """(global, local) boolean masks [B, 1, K, K] of the kept tokens (None: attend to everything);
    the pattern of `SequenceLayout.dense_mask` on the kept tokens' own frames and padding."""
    keys = None if real is None else real[:, None, None, :]
    if window is None:
        return keys, None
    fq, fk = frame[:, :, None], frame[:, None, :]
    local = ((fq < 0) | (fk < 0) | ((fq - fk).abs() <= window))[:, None]
    return keys, local if keys is None else local & keys


def block_masks(frame: Tensor, real: Tensor | None, window: int | None):
    """The same patterns as `dense_masks` as flex-attention BlockMasks, from per-sample statistics
    of each 128-token block (the kept tokens of a frame differ per sample); never K x K."""
    glob = None if real is None else _block_mask(frame, real, None)
    if window is None:
        return glob, None
    if real is None:
        real = torch.ones_like(frame, dtype=torch.bool)
    return glob, _block_mask(frame, real, window)


def _block_mask(frame: Tensor, real: Tensor, window: int | None):
    from torch.nn.attention.flex_attention import BlockMask

    B, K = frame.shape
    n = -(-K // BLOCK_SIZE)
    pad = n * BLOCK_SIZE - K
    f = torch.nn.functional.pad(frame, (0, pad), value=-1).view(B, n, BLOCK_SIZE)
    r = torch.nn.functional.pad(real, (0, pad), value=False).view(B, n, BLOCK_SIZE)
    inside = torch.arange(n * BLOCK_SIZE, device=frame.device).view(n, BLOCK_SIZE) < K
    video = f >= 0
    k_any_real, k_all_real = r.any(-1), r.all(-1)  # [B, n]; a block past the end is never all real
    any_ = k_any_real[:, None, :].expand(-1, n, -1)  # [B, nq, nk]
    all_ = k_all_real[:, None, :] & inside.all(-1)[None, :, None]
    if window is not None:
        has_video, has_other = video.any(-1), (~video & inside).any(-1)
        lo = torch.where(video, f, torch.iinfo(f.dtype).max).amin(-1)
        hi = f.amax(-1)  # (-1 where the block holds no video)
        both = has_video[:, :, None] & has_video[:, None, :]
        near_any = both & (lo[:, :, None] - window <= hi[:, None, :])
        near_any &= lo[:, None, :] <= hi[:, :, None] + window
        reach = torch.maximum(hi[:, :, None] - lo[:, None, :], hi[:, None, :] - lo[:, :, None])
        k_real_other = (r & ~video).any(-1)
        any_ = k_real_other[:, None, :] | (has_other[:, :, None] & k_any_real[:, None, :]) | near_any
        all_ = all_ & (~both | (reach <= window))
    limit_frame, limit_real = f.reshape(B, -1), r.reshape(B, -1)  # padded: flex reads past K

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = limit_real[b, kv_idx]
        if window is not None:
            fq, fk = limit_frame[b, q_idx], limit_frame[b, kv_idx]
            allowed = allowed & ((fq < 0) | (fk < 0) | ((fq - fk).abs() <= window))
        return allowed

    partial, full = (any_ & ~all_)[:, None], all_[:, None]
    return BlockMask.from_kv_blocks(
        *_indices(partial), *_indices(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(K, K)
    )
