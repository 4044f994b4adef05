"""MagiHumanDiT: the single-stream audio-video transformer of daVinci-MagiHuman.

The sequence of one sample is `[video tokens | audio tokens | text tokens]` with full
bidirectional attention (frame-local for video queries in the SR model's local layers). There
is no timestep input: the model reads the noise level from its input. Parameter names and
shapes equal the released checkpoints'.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checkpointing import checkpoint_block
from .config import MagiHumanConfig
from .layers import Float32Linear, RMSNorm, TransformerLayer
from .layout import SequenceLayout
from .rope import RotaryEmbedding
from .routing import TokenRoute, block_masks, dense_masks, gather_tokens, put_back, token_facts


def patchify(video: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """[B, C, T, H, W] -> [B, (T/pT)(H/pH)(W/pW), C pT pH pW]; token channel order (C, pT, pH, pW)."""
    B, C, T, H, W = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * pt * ph * pw)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """[B, N, pT pH pW C] -> [B, C, T, H, W]; OUTPUT token channel order is (pT, pH, pW, C)."""
    B = tokens.shape[0]
    (t, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(B, t, h, w, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, -1, t * pt, h * ph, w * pw)


class Adapter(nn.Module):
    """Input embedders (with bias, float32) and the RoPE frequency buffer."""

    def __init__(self, cfg: MagiHumanConfig):
        super().__init__()
        self.video_embedder = Float32Linear(cfg.video_in_channels, cfg.hidden_size)
        self.audio_embedder = Float32Linear(cfg.audio_in_channels, cfg.hidden_size)
        self.text_embedder = Float32Linear(cfg.text_in_channels, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class Block(nn.Module):
    def __init__(self, cfg: MagiHumanConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))


class MagiHumanDiT(nn.Module):
    def __init__(self, config: MagiHumanConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.adapter = Adapter(config)
        self.block = Block(config)
        self.final_norm_video = RMSNorm(d, eps=config.norm_eps)
        self.final_norm_audio = RMSNorm(d, eps=config.norm_eps)
        self.final_linear_video = Float32Linear(d, config.video_in_channels, bias=False)
        self.final_linear_audio = Float32Linear(d, config.audio_in_channels, bias=False)
        self.activation_checkpointing = config.activation_checkpointing
        self.checkpoint_every = 1  # selective checkpointing: every k-th block (magitrain.parallel)
        self.checkpoint_dtype: torch.dtype | None = None  # dtype checkpointed block inputs are kept in
        self.context_parallel = None  # magitrain.parallel.context_parallel sets it (Ulysses)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Training-from-scratch init: normal weights, zero biases and zero norm offsets (= scale 1)."""
        if not self.adapter.rope.bands.is_meta:
            self.adapter.rope.reset_bands()
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def _check_inputs(self, video: Tensor, audio: Tensor, text: Tensor, text_len: Tensor | None) -> None:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        if video.ndim != 5 or video.shape[1] != cfg.latent_channels:
            raise ValueError(f"video must be [B, {cfg.latent_channels}, T, H, W], got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        if T % pt or H % ph or W % pw:
            raise ValueError(
                f"video latent T, H, W = {T}, {H}, {W} must be multiples of the patch {cfg.patch_size}"
            )
        B = video.shape[0]
        if audio.ndim != 3 or audio.shape[0] != B or audio.shape[2] != cfg.audio_in_channels:
            raise ValueError(f"audio must be [{B}, N, {cfg.audio_in_channels}], got {tuple(audio.shape)}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.text_in_channels:
            raise ValueError(f"text must be [{B}, L, {cfg.text_in_channels}], got {tuple(text.shape)}")
        if text_len is not None and tuple(text_len.shape) != (B,):
            raise ValueError(f"text_len must be [{B}], got {tuple(text_len.shape)}")

    def forward(
        self,
        video: Tensor,
        audio: Tensor,
        text: Tensor,
        text_len: Tensor | None = None,
        coords_style: str | None = None,
        ref_audio: Tensor | None = None,
        ref_len: Tensor | None = None,
        route: TokenRoute | None = None,
    ) -> tuple[Tensor, Tensor]:
        """video [B, 48, T, H, W], audio [B, N, 64], text [B, L, C_text] -> (v_video, v_audio), same shapes.

        `text_len` [B] gives each sample's real text tokens when prompts are padded; padding is
        masked out of attention, so it changes no output. Padding no sample uses is dropped (and
        the mask too when nothing is left padded) where that costs no wait for the device: for a
        CPU `text_len`, or outside autograd (sampling, where one sync per forward of the network is
        nothing). A training step on a GPU keeps the batch's padding and masks it.

        `ref_audio` [B, R, 64] (optional): clean audio latents of the wanted voice, placed after the
        audio at the release's reference-audio RoPE slot (`layout.REF_AUDIO_OFFSET`), never an
        output; `ref_len` [B] its real tokens per sample (0: no reference), padding as `text_len`.

        `route` (TREAD, training only): layers `route.start..route.end` run on its kept tokens
        alone; the others skip them unchanged (magitrain.model.routing). Reference audio and text
        are never routed.
        """
        cfg = self.config
        self._check_inputs(video, audio, text, text_len)
        text, text_len = _drop_padding(text, text_len)
        ref_audio, ref_len = _drop_padding(*_reference(audio, ref_audio, ref_len))
        B, _, T, H, W = video.shape
        pt, ph, pw = cfg.patch_size
        grid = (T // pt, H // ph, W // pw)
        layout = SequenceLayout(
            B, *grid, audio.shape[1], text.shape[1], text_len, ref_audio.shape[1], ref_len
        )

        with torch.autocast(video.device.type, enabled=False):  # embedders and RoPE in float32
            x = torch.cat(
                [
                    self.adapter.video_embedder(patchify(video.float(), cfg.patch_size)),
                    self.adapter.audio_embedder(
                        (torch.cat([audio, ref_audio], 1) if ref_audio.shape[1] else audio).float()
                    ),
                    self.adapter.text_embedder(text.float()),
                ],
                dim=1,
            )  # [B, S, D]
            rope = self.adapter.rope(layout.positions(coords_style or cfg.coords_style, x.device))

        x = self._run_layers(x, rope, layout, route)

        nv, na = layout.n_video, layout.n_audio
        with torch.autocast(video.device.type, enabled=False):  # output heads in float32
            v_video = self.final_linear_video(self.final_norm_video(x[:, :nv]))
            v_audio = self.final_linear_audio(self.final_norm_audio(x[:, nv : nv + na]))
        return unpatchify(v_video, grid, cfg.patch_size), v_audio

    def _run_layers(self, x: Tensor, rope: Tensor, layout: SequenceLayout, route: TokenRoute | None):
        """The transformer layers over the whole sequence [B, S, D] (each context-parallel rank over
        its slice); with `route`, layers `route.start..route.end` over its kept tokens alone."""
        masks = full_masks = self._masks(layout, x.device)
        if route is not None:
            route.check(len(self.block.layers), layout)
        full = (rope, layout.splits)  # the whole sequence's RoPE and splits, for the put-back
        x, rope, splits = self._split(x, *full)
        held = kept = None
        for i, layer in enumerate(self.block.layers):
            if route is not None and i == route.start:  # set aside all but the kept tokens
                kept, routed_splits = route.kept(layout, x.device)
                held = self._gather(x)
                kept_rope = gather_tokens(full[0], kept)
                x, rope, splits = self._split(gather_tokens(held, kept), kept_rope, routed_splits)
                masks = self._masks(layout, x.device, kept)
            if self.activation_checkpointing and torch.is_grad_enabled() and i % self.checkpoint_every == 0:
                x = checkpoint_block(layer, x, splits, rope, *masks, saved_dtype=self.checkpoint_dtype)
            else:
                x = layer(x, splits, rope, *masks)
            if route is not None and i == route.end:  # the set-aside tokens re-enter in place
                x, rope, splits = self._split(put_back(held, kept, self._gather(x)), *full)
                masks, held = full_masks, None
        return self._gather(x)

    def _split(self, x: Tensor, rope: Tensor, splits: tuple[int, int, int]):
        """This rank's slice of the tokens, of RoPE and of the modality routing (context parallel)."""
        cp = self.context_parallel
        return (x, rope, splits) if cp is None else cp.shard(x, rope, splits)

    def _gather(self, x: Tensor) -> Tensor:
        """The whole sequence from the context-parallel ranks' slices (x itself without CP)."""
        return x if self.context_parallel is None else self.context_parallel.gather(x)

    def _masks(self, layout: SequenceLayout, device: torch.device, kept: Tensor | None = None):
        """(global, local) attention masks of this batch, or of its `kept` tokens [B, K] (token
        routing): flex block masks on CUDA, dense elsewhere."""
        cfg = self.config
        window = cfg.frame_window if cfg.local_attn_layers else None
        use_flex = cfg.attn_backend == "flex" or (cfg.attn_backend == "auto" and device.type == "cuda")
        if kept is not None:
            return (block_masks if use_flex else dense_masks)(*token_facts(layout, kept), window)
        build = layout.block_mask if use_flex else layout.dense_mask
        global_mask = build(None, device)
        local_mask = build(window, device) if window is not None else None
        return global_mask, local_mask


def _reference(audio: Tensor, ref_audio: Tensor | None, ref_len: Tensor | None):
    """(reference [B, R, 64], lengths): checked, or an empty reference when there is none."""
    B, _, C = audio.shape
    if ref_audio is None:
        return audio.new_zeros(B, 0, C), None
    if ref_audio.ndim != 3 or ref_audio.shape[0] != B or ref_audio.shape[2] != C:
        raise ValueError(f"ref_audio must be [{B}, R, {C}], got {tuple(ref_audio.shape)}")
    if ref_len is not None and tuple(ref_len.shape) != (B,):
        raise ValueError(f"ref_len must be [{B}], got {tuple(ref_len.shape)}")
    return ref_audio, ref_len


def _drop_padding(tokens: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Padding no sample uses dropped, and the lengths too when nothing is left padded, where that
    costs no wait for the device (CPU lengths, or outside autograd)."""
    if lengths is not None and (lengths.device.type == "cpu" or not torch.is_grad_enabled()):
        tokens = tokens[:, : int(lengths.max())]
        if bool((lengths == tokens.shape[1]).all()):
            lengths = None
    return tokens, lengths


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
