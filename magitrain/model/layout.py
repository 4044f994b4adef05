"""The packed token sequence of a batch: where each modality sits, RoPE positions and attention masks.

One sample is the sequence `[video | audio | reference audio | text]`; a batch stacks samples that
share the video grid and audio length, with text padded to the longest prompt and the optional
reference audio (the wanted voice, clean latents; none by default) to the longest reference.
Reference tokens are audio-modality tokens (the audio weights route them) at RoPE time coordinates
from `REF_AUDIO_OFFSET` on, the slot the release reserves (`ref_audio_offset = 1000`), and like
text they are global tokens of the frame-local attention. Positions and masks are functions of
this layout alone, so a dense boolean mask (CPU, tests) and a flex-attention block mask (GPU)
describe the same attention pattern.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

VIDEO, AUDIO, TEXT = 0, 1, 2
# The release's DataProxyConfig.ref_audio_offset: reference audio's first RoPE time coordinate.
# Which coordinates inside the slot is ours (the release uses none): the clip audio's own spacing
# (4 audio latents per latent frame), h = w = 0, starting at the offset.
REF_AUDIO_OFFSET = 1000.0
# The reference lengths magitrain trains (data.voice_reference) and infer.py's voice= accepts: a
# shorter one carries too little of a voice; a longer one is clipped (the release says nothing).
REF_AUDIO_MIN_SECONDS, REF_AUDIO_MAX_SECONDS = 1.0, 10.0


def _position_scale(size: Tensor | float, ref: float) -> Tensor | float:
    """Released coordinate scaling `(ref - 1) / (size - 1)`, 1 where the axis has a single entry."""
    if isinstance(size, Tensor):
        return torch.where(size > 1, (ref - 1) / (size - 1).clamp(min=1), torch.ones_like(size))
    return (ref - 1) / (size - 1) if size > 1 else 1.0


def _audio_positions(batch: int, n: int, start: float, **f32) -> Tensor:
    """[batch, n, 3] positions of n audio latents from time `start`: t on the video latent-frame axis
    (the released audio scaling, (n - 1) // 4 + 1 frames), h = w = 0."""
    frames = (n - 1) // 4 + 1
    out = torch.zeros(batch, n, 3, **f32)
    out[..., 0] = start + torch.arange(n, **f32) * _position_scale(n, frames)
    return out


@dataclass(frozen=True)
class SequenceLayout:
    batch: int
    frames: int  # latent frames T
    grid_h: int  # patch rows H / 2
    grid_w: int  # patch columns W / 2
    n_audio: int
    n_text: int  # text slots in the sequence (the longest prompt of the batch)
    text_len: Tensor | None = None  # [B] real text tokens per sample; None when all n_text are real
    n_ref: int = 0  # reference-audio slots (the longest reference of the batch); 0: no reference
    ref_len: Tensor | None = None  # [B] real reference tokens per sample; None when all n_ref are real

    @property
    def n_video(self) -> int:
        return self.frames * self.grid_h * self.grid_w

    @property
    def splits(self) -> tuple[int, int, int]:
        """Tokens per modality routing: reference audio is audio (it follows the clip's audio)."""
        return (self.n_video, self.n_audio + self.n_ref, self.n_text)

    @property
    def ref_start(self) -> int:
        return self.n_video + self.n_audio

    @property
    def text_start(self) -> int:
        return self.n_video + self.n_audio + self.n_ref

    @property
    def seq_len(self) -> int:
        return self.text_start + self.n_text

    def ref_lengths(self, device) -> Tensor:
        if self.ref_len is None:
            return torch.full((self.batch,), self.n_ref, device=device, dtype=torch.float32)
        return self.ref_len.to(device=device, dtype=torch.float32)

    def text_lengths(self, device) -> Tensor:
        if self.text_len is None:
            return torch.full((self.batch,), self.n_text, device=device, dtype=torch.float32)
        return self.text_len.to(device=device, dtype=torch.float32)

    def positions(self, coords_style: str, device=None) -> Tensor:
        """(t, h, w) RoPE positions, [B, S, 3] float32, as the released data proxy computes them."""
        f32 = dict(device=device, dtype=torch.float32)
        t = torch.arange(self.frames, **f32)
        h = torch.arange(self.grid_h, **f32) - (self.grid_h - 1) / 2
        w = torch.arange(self.grid_w, **f32) - (self.grid_w - 1) / 2
        video = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1).reshape(1, -1, 3)
        video = video.expand(self.batch, -1, -1)

        audio = _audio_positions(self.batch, self.n_audio, 0.0, **f32)
        reference = _audio_positions(self.batch, self.n_ref, REF_AUDIO_OFFSET, **f32)

        lengths = self.text_lengths(device)[:, None]  # [B, 1]
        slot = torch.arange(self.n_text, **f32)[None]  # [1, L]
        if coords_style == "v2":  # t = -L..-1 with ref 1: all zero (for L > 1)
            text_t = (slot - lengths) * _position_scale(lengths, 1.0)
        elif coords_style == "v1":  # t = 0..L-1 with ref 2: spread over [0, 1]
            text_t = slot * _position_scale(lengths, 2.0)
        else:
            raise ValueError(f"coords_style must be 'v1' or 'v2', got {coords_style!r}")
        text = torch.zeros(self.batch, self.n_text, 3, **f32)
        text[..., 0] = text_t
        return torch.cat([video, audio, reference, text], dim=1)

    def key_is_real(self, device=None) -> Tensor | None:
        """[B, S] True for tokens that exist (False for text and reference padding); None when
        nothing is padded."""
        if self.text_len is None and self.ref_len is None:
            return None
        idx = torch.arange(self.seq_len, device=device)[None, :]
        text_ok = idx < self.text_start + self.text_lengths(device)[:, None]
        ref_ok = idx < self.ref_start + self.ref_lengths(device)[:, None]
        return torch.where(idx < self.ref_start, True, torch.where(idx < self.text_start, ref_ok, text_ok))

    def video_frame_of_token(self, device=None) -> Tensor:
        """[S] latent frame index of each video token, -1 for audio and text tokens."""
        frame = torch.full((self.seq_len,), -1, device=device, dtype=torch.long)
        frame[: self.n_video] = torch.arange(self.frames, device=device).repeat_interleave(
            self.grid_h * self.grid_w
        )
        return frame

    def dense_mask(self, frame_window: int | None, device=None) -> Tensor | None:
        """Boolean attention mask, True = may attend, [B, 1, S, S] (or None: attend to everything).

        With `frame_window` set, a video query of latent frame i sees video keys of frames
        i-w..i+w plus every audio and text key; audio and text queries see everything.
        """
        real = self.key_is_real(device)
        if frame_window is None:
            return None if real is None else real[:, None, None, :]
        frame = self.video_frame_of_token(device)
        q_video, k_video = frame[:, None] >= 0, frame[None, :] >= 0
        near = (frame[:, None] - frame[None, :]).abs() <= frame_window
        mask = (~q_video | ~k_video | near)[None, None]
        if real is not None:
            mask = mask & real[:, None, None, :]
        return mask

    def block_mask(self, frame_window: int | None, device=None):
        """The same pattern as `dense_mask` as a flex-attention BlockMask (None when unmasked).

        Built from per-block token ranges, never from an S x S tensor: at the 1080p sequence (~66k
        tokens, 4.4e9 pairs) `create_block_mask` would first materialise ~80 GB. Shape-only block
        statistics are cached per layout shape; the per-batch text lengths enter as tensor ops, so
        building the mask of a training step never waits for the device.
        """
        from torch.nn.attention.flex_attention import BlockMask

        if frame_window is None and self.text_len is None and self.ref_len is None:
            return None
        device = torch.device(device) if device is not None else torch.device("cpu")
        n_other = self.n_audio + self.n_ref
        stats = _block_stats(self.frames, self.grid_h * self.grid_w, n_other, self.n_text, device)
        limit = self.text_start + self.text_lengths(device).long()  # [B] keys up to the text padding
        # reference padding: keys [hole, ref_end) of each sample do not exist (hole = ref_end: none)
        ref_end = self.text_start
        hole = self.ref_start + self.ref_lengths(device).long()  # [B]
        q, k = stats, stats

        # kv blocks with any / only existing keys, and ones overlapping the existing audio + text
        def real_in(lo: Tensor, hi: Tensor) -> Tensor:  # [B, n]: keys [lo, hi) hold a real one
            hi = torch.minimum(hi[None], limit[:, None])
            lo = lo[None].expand_as(hi)
            return (lo < hi) & ~((lo >= hole[:, None]) & (hi <= ref_end))

        k_any_real = real_in(k["start"], k["end"])
        k_all_real = k["end_padded"][None] <= limit[:, None]
        outside_hole = (k["end_padded"][None] <= hole[:, None]) | (k["start"][None] >= ref_end)
        k_all_real &= outside_hole | (hole[:, None] >= ref_end)
        k_real_nonvideo = real_in(torch.maximum(k["start"], k["video_end"]), k["end"])
        any_ = k_any_real[:, None, :].expand(-1, stats["n"], -1)  # [B, nq, nk]
        all_ = (k_all_real[:, None, :] & q["in_range"][None, :, None]).expand(-1, stats["n"], -1)
        if frame_window is not None:
            w = frame_window
            both_video = q["has_video"][:, None] & k["has_video"][None, :]
            near_any = both_video & (q["frame_lo"][:, None] - w <= k["frame_hi"][None, :])
            near_any &= k["frame_lo"][None, :] <= q["frame_hi"][:, None] + w
            reach = torch.maximum(
                q["frame_hi"][:, None] - k["frame_lo"][None, :],
                k["frame_hi"][None, :] - q["frame_lo"][:, None],
            )
            near_all = reach <= w
            any_ = (
                k_real_nonvideo[:, None, :]
                | (q["has_nonvideo"][None, :, None] & k_any_real[:, None, :])
                | near_any[None]
            )
            all_ = all_ & (~both_video | near_all)[None]
        partial = (any_ & ~all_)[:, None]  # [B, 1, nq, nk]: one pattern for every head
        full = all_[:, None]
        frame, window, ref_padded = stats["frame"], frame_window, self.ref_len is not None

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = kv_idx < limit[b]
            if ref_padded:
                allowed = allowed & ((kv_idx < hole[b]) | (kv_idx >= ref_end))
            if window is not None:
                fq, fk = frame[q_idx], frame[kv_idx]
                allowed = allowed & ((fq < 0) | (fk < 0) | ((fq - fk).abs() <= window))
            return allowed

        return BlockMask.from_kv_blocks(
            *_indices(partial),
            *_indices(full),
            BLOCK_SIZE=BLOCK_SIZE,
            mask_mod=mask_mod,
            seq_lengths=(self.seq_len, self.seq_len),
        )


BLOCK_SIZE = 128  # flex attention's tile: masks are described per 128 x 128 block


def _indices(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(number, indices) of the marked kv blocks of each q block, marked ones first, as BlockMask wants."""
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return blocks.sum(-1, dtype=torch.int32), order.to(torch.int32)


@functools.lru_cache(maxsize=32)
def _block_stats(frames: int, per_frame: int, n_audio: int, n_text: int, device: torch.device) -> dict:
    """Per 128-token block: token range, whether it holds video / other tokens, its video frames."""
    n_video = frames * per_frame
    seq = n_video + n_audio + n_text
    n = -(-seq // BLOCK_SIZE)
    start = torch.arange(n, device=device) * BLOCK_SIZE
    end_padded = start + BLOCK_SIZE
    end = end_padded.clamp(max=seq)
    video_end = torch.full_like(start, n_video)
    has_video = start < n_video
    last_video = torch.minimum(end, video_end) - 1
    frame = torch.full((n * BLOCK_SIZE,), -1, device=device, dtype=torch.long)  # -1: not video
    frame[:n_video] = torch.arange(frames, device=device).repeat_interleave(per_frame)
    return {
        "n": n,
        "start": start,
        "end": end,
        "end_padded": end_padded,
        "video_end": video_end,
        "in_range": end_padded <= seq,  # blocks past the sequence end are never "full"
        "has_video": has_video,
        "has_nonvideo": end > n_video,
        "frame_lo": torch.where(has_video, start // max(per_frame, 1), -1),
        "frame_hi": torch.where(has_video, last_video // max(per_frame, 1), -1),
        "frame": frame,
    }
