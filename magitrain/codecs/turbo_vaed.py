"""Turbo-VAED: the release's distilled decode-only video VAE for the Wan2.2 latent space.

Written from /work/shared/TURBO_VAED.md (the facts sheet of daVinci-MagiHuman's
`inference/model/turbo_vaed`), names as in the released state dict so that the released
`checkpoint-340000.ckpt` loads strictly. The maths in one paragraph: a 48-channel latent goes
through a 3x3x3 conv, a mid block and four up blocks of residual blocks whose norms are
parameter-free RMS norms over channels; two temporal x2 and three spatial x2 upsamplers and a final
unpatchify (p = 2) give the 4 x 16 x 16 stride. Convolutions pad time by replicating the edge
frames (the "causal" conv of the release is not causal) and carry no state, so a clip is decoded
in independent windows of 7 latent frames with one frame of context on each side, and the window
plan is part of the output: `TurboVAED.decode` reproduces it exactly.

We write the module (rather than import the release's) because the release's class hard-codes
CUDA tensors and `torch.compile` at import, and loads non-strictly. It is a diffusers
`ModelMixin`/`ConfigMixin`, so `save_pretrained` / `from_pretrained` of a local folder work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from magitrain.checkpoint import check_layout
from magitrain.codecs.video import LATENT_CHANNELS, LATENTS_MEAN, LATENTS_STD

log = logging.getLogger("magitrain")

# Tensors of the released checkpoint that only training used (feature-alignment heads); the
# release's non-strict loader ignores them too.
TRAINING_ONLY_PREFIXES = ("aligned_feature_projection_heads.",)
NORM_EPS = 1e-8  # hard-coded in the release for norm1, norm2 and the output norm


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Parameter-free RMS norm over channels (dim 1): statistics and product in fp32, one rounding."""
    variance = x.float().pow(2).mean(1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


class ReplicatePadConv3d(nn.Module):
    """Conv3d with zero padding in space and edge-frame replication in time (symmetric: NOT causal,
    although the release calls it `TurboVAEDCausalConv3d`). Holds `conv`, hence the `.conv.` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.time_pad = (kt - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            p = self.time_pad
            x = torch.cat([x[:, :, :1].repeat(1, 1, p, 1, 1), x, x[:, :, -1:].repeat(1, 1, p, 1, 1)], dim=2)
        return self.conv(x)


class ResnetBlock3d(nn.Module):
    """norm1 -> act (ReLU after an upsampler, else SiLU) -> conv1 -> norm2 -> SiLU -> conv2, plus the
    input (through norm3 and a 1x1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, shortcut_eps: float, relu_first: bool = False):
        super().__init__()
        self.relu_first, self.shortcut_eps = relu_first, shortcut_eps
        self.conv1 = ReplicatePadConv3d(in_channels, out_channels)
        self.conv2 = ReplicatePadConv3d(out_channels, out_channels)
        self.conv_shortcut = (
            ReplicatePadConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = rms_norm(x, NORM_EPS)
        h = self.conv1(F.relu(h) if self.relu_first else F.silu(h))
        h = self.conv2(F.silu(rms_norm(h, NORM_EPS)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(rms_norm(x, self.shortcut_eps))
        return h + x


class NearestUpsample2d(nn.Module):
    """Nearest x2 in fp32, cast back (exact for an integer factor). Index 0 of `resample`."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Upsampler(nn.Module):
    """The release's `WanResample`. `upsample3d`: time_conv C -> 2C, interleave to 2T frames (output
    frame 2t + s takes channel half s of frame t), drop frame 0 on a first chunk; then (both modes)
    nearest x2 + Conv2d per frame. Channels are unchanged."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(NearestUpsample2d(), nn.Conv2d(channels, channels, 3, padding=1))
        self.time_conv = ReplicatePadConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, is_first_chunk: bool) -> Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None:
            x = self.time_conv(x).view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            if is_first_chunk:
                x = x[:, :, 1:]
            t = x.shape[2]
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return x.view(b, t, c, 2 * h, 2 * w).transpose(1, 2)


class MidBlock3d(nn.Module):
    def __init__(self, channels: int, num_layers: int, shortcut_eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3d(channels, channels, shortcut_eps) for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UpBlock3d(nn.Module):
    """`conv_in` (a resnet, only when the width changes) -> `upsamplers.0` (optional) -> `resnets`."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, shortcut_eps: float, upsample: str | None
    ):
        super().__init__()
        self.conv_in = (
            ResnetBlock3d(in_channels, out_channels, shortcut_eps) if in_channels != out_channels else None
        )
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsampler(out_channels, temporal=upsample == "upsample3d")])
        self.resnets = nn.ModuleList(
            ResnetBlock3d(out_channels, out_channels, shortcut_eps, relu_first=upsample is not None)
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor, is_first_chunk: bool) -> Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        for upsampler in self.upsamplers or ():
            x = upsampler(x, is_first_chunk)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class Decoder3d(nn.Module):
    """One window: [B, 48, T, h, w] (de-normalised) -> [B, 3, 4T - 3F, 16h, 16w], F = is_first_chunk.

    The config lists are in encoder order and are used reversed (element 0 of the reversed
    `layers_per_block` is the mid block), as in the release.
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: tuple[int, ...],
        spatio_temporal_scaling: tuple[bool, ...],
        spatio_only: tuple[bool, ...],
        patch_size: int,
        shortcut_eps: float,
    ):
        super().__init__()
        channels = list(reversed(block_out_channels))
        layers = list(reversed(layers_per_block))
        scaling, only_2d = list(reversed(spatio_temporal_scaling)), list(reversed(spatio_only))
        self.patch_size = patch_size
        self.conv_in = ReplicatePadConv3d(latent_channels, channels[0])
        self.mid_block = MidBlock3d(channels[0], layers[0], shortcut_eps)
        self.up_blocks = nn.ModuleList()
        previous = channels[0]
        for i, width in enumerate(channels):
            upsample = ("upsample2d" if only_2d[i] else "upsample3d") if scaling[i] else None
            self.up_blocks.append(UpBlock3d(previous, width, layers[i + 1], shortcut_eps, upsample))
            previous = width
        self.conv_out = ReplicatePadConv3d(previous, out_channels * patch_size**2)

    def forward(self, z: Tensor, is_first_chunk: bool) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x, is_first_chunk)
        x = self.conv_out(F.silu(rms_norm(x, NORM_EPS)))
        return unpatchify(x, self.patch_size)  # channel c*p*p + dx*p + dy: width offset first, as Wan2.2


@dataclass(frozen=True)
class Window:
    """Latent frames [start, end) decoded as one call; output frames [front, len - back) are kept."""

    start: int
    end: int
    is_first_chunk: bool
    trim_front: int
    trim_back: int


def window_plan(
    num_frames: int, first_chunk_size: int, step_size: int, overlap: int
) -> tuple[int, list[Window]]:
    """The release's sliding window: (padding latent frames, windows) for `num_frames` latents.

    The clip is padded (repeating its last latent) to `first + k * step` frames. The first window
    gets one right-context frame, middle windows one on each side, the last one on the left; each
    context frame's `overlap` (= temporal ratio) output frames are dropped, and the windows are
    concatenated without blending.
    """
    if num_frames < 1:
        raise ValueError(f"TurboVAED.decode needs at least one latent frame, got {num_frames}")
    if num_frames < first_chunk_size:
        pad = first_chunk_size - num_frames
    else:
        pad = -(num_frames - first_chunk_size) % step_size
    total = num_frames + pad
    if total == first_chunk_size:
        return pad, [Window(0, total, True, 0, 0)]
    windows = [Window(0, first_chunk_size + 1, True, 0, overlap)]
    for i in range(first_chunk_size, total, step_size):
        last = i + step_size == total
        windows.append(
            Window(i - 1, i + step_size + (0 if last else 1), False, overlap, 0 if last else overlap)
        )
    return pad, windows


class TurboVAED(ModelMixin, ConfigMixin):
    """Decode-only VAE. Config keys are the release's JSON keys; the defaults are the released
    config (`TurboV3-Wan22-TinyShallow_7_7.json`), not the release class's own defaults.

    Keys the release accepts but never uses (`in_channels`, `patch_size_t`, `scaling_factor`,
    `spatial_compression_ratio`, `decoder_dw_kernel_size`) are stored and ignored; options it
    asserts away or that the released config does not use (causal convs, depthwise convs, the
    pixel-shuffle head) are refused by name. Training-only keys of the JSON (`aligned_*`) are
    dropped by diffusers with a warning.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = LATENT_CHANNELS,
        decoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 512),
        decoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3),
        decoder_spatio_temporal_scaling: tuple[bool, ...] = (False, True, True, True),
        decoder_spatio_only: tuple[bool, ...] = (False, True, False, False),
        decoder_is_dw_conv: tuple[bool, ...] = (False, False, False, False, False),
        decoder_dw_kernel_size: int = 5,
        decoder_causal: bool = False,
        patch_size: int = 2,
        patch_size_t: int = 1,
        use_unpatchify: bool = True,
        resnet_norm_eps: float = 1e-6,
        scaling_factor: float = 1.0,
        spatial_compression_ratio: int = 16,
        temporal_compression_ratio: int = 4,
        first_chunk_size: int = 7,
        step_size: int = 7,
    ):
        super().__init__()
        _check_config(
            latent_channels=latent_channels,
            stages=len(decoder_block_out_channels),
            decoder_layers_per_block=decoder_layers_per_block,
            decoder_spatio_temporal_scaling=decoder_spatio_temporal_scaling,
            decoder_spatio_only=decoder_spatio_only,
            decoder_is_dw_conv=decoder_is_dw_conv,
            decoder_causal=decoder_causal,
            use_unpatchify=use_unpatchify,
            temporal_compression_ratio=temporal_compression_ratio,
            chunks=(first_chunk_size, step_size),
        )
        self.decoder = Decoder3d(
            latent_channels, out_channels, tuple(decoder_block_out_channels), tuple(decoder_layers_per_block),
            tuple(decoder_spatio_temporal_scaling), tuple(decoder_spatio_only), patch_size, resnet_norm_eps,
        )  # fmt: skip

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised -> raw Wan2.2 latents as the release rounds them: `z / (1/std) + mean` in fp32
        (division by the fp32 reciprocal, not a product with std: they differ in the last bit), cast
        back to z's dtype. mean and std are fp32 whatever the module dtype, as in the release."""
        stats = dict(dtype=torch.float32, device=z.device)
        mean = torch.tensor(LATENTS_MEAN, **stats).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(LATENTS_STD, **stats).view(1, -1, 1, 1, 1)
        return (z / inv_std + mean).to(z.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, 48, N, h, w] -> [B, 3, 4N - 3, 16h, 16w] in the module dtype,
        unclamped (pixels roughly in [-1, 1]). Windows as in `window_plan`."""
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"TurboVAED.decode expects [B, {cfg.latent_channels}, T, h, w], got {tuple(z.shape)}"
            )
        z = self.denormalize(z)
        overlap = cfg.temporal_compression_ratio
        pad, windows = window_plan(z.shape[2], cfg.first_chunk_size, cfg.step_size, overlap)
        if pad:
            z = torch.cat([z, z[:, :, -1:].repeat(1, 1, pad, 1, 1)], dim=2)
        chunks = []
        for w in windows:
            out = self.decoder(z[:, :, w.start : w.end], is_first_chunk=w.is_first_chunk)
            chunks.append(out[:, :, w.trim_front : out.shape[2] - w.trim_back])
        out = torch.cat(chunks, dim=2)
        return out[:, :, : out.shape[2] - pad * overlap]

    @classmethod
    def from_release(
        cls,
        ckpt: str | Path,
        config: str | Path,
        dtype: torch.dtype = torch.float32,
        field: str = "turbo_vaed_path",
    ) -> TurboVAED:
        """The released files: the JSON config and a `.ckpt` whose `ema_state_dict` holds the weights.

        Strict: after stripping the DDP `module.` prefix and dropping the training-only alignment
        heads, the tensors must be exactly this module's (names and shapes), else
        `CheckpointMismatchError` names the missing, unexpected and wrongly shaped keys.
        """
        ckpt, config = Path(ckpt), Path(config)
        for path in (ckpt, config):
            if not path.is_file():
                raise FileNotFoundError(f"codecs.{field}: {path} does not exist")
        try:
            with torch.device("meta"):
                model = cls.from_config(json.loads(config.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"codecs.{field}: {config} is not valid JSON: {err}") from err
        state = release_state_dict(ckpt, field)
        check_layout(model, {k: tuple(v.shape) for k, v in state.items()}, f"{ckpt} (ema_state_dict)")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype).eval().requires_grad_(False)


def release_state_dict(ckpt: Path, field: str = "turbo_vaed_path") -> dict[str, Tensor]:
    """`ema_state_dict` of a released Turbo-VAED checkpoint, `module.` stripped, training heads dropped."""
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and weights-only errors all mean "not loadable"
        raise ValueError(f"codecs.{field}: {ckpt} is not a loadable torch checkpoint: {err}") from err
    if not isinstance(blob, dict) or "ema_state_dict" not in blob:
        keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise KeyError(f"codecs.{field}: {ckpt} has no 'ema_state_dict' (found {keys})")
    state, dropped = {}, 0
    for key, value in blob["ema_state_dict"].items():
        key = key.removeprefix("module.")
        if key.startswith(TRAINING_ONLY_PREFIXES):
            dropped += 1
            continue
        state[key] = value
    if dropped:
        log.info("%s: skipped %d training-only tensors (%s*)", ckpt, dropped, TRAINING_ONLY_PREFIXES[0])
    return state


def _check_config(
    latent_channels: int,
    stages: int,
    decoder_layers_per_block,
    decoder_spatio_temporal_scaling,
    decoder_spatio_only,
    decoder_is_dw_conv,
    decoder_causal: bool,
    use_unpatchify: bool,
    temporal_compression_ratio: int,
    chunks: tuple[int, int],
) -> None:
    """Refuse configs this implementation would silently decode differently from the release."""
    lengths = {
        "decoder_layers_per_block": (decoder_layers_per_block, stages + 1),
        "decoder_spatio_temporal_scaling": (decoder_spatio_temporal_scaling, stages),
        "decoder_spatio_only": (decoder_spatio_only, stages),
        "decoder_is_dw_conv": (decoder_is_dw_conv, stages + 1),
    }
    for key, (value, expected) in lengths.items():
        if len(value) != expected:
            raise ValueError(f"TurboVAED config: {key} has {len(value)} entries, expected {expected}")
    if decoder_causal:
        raise ValueError(
            "TurboVAED config: decoder_causal=true is not supported (the release asserts it false)"
        )
    if any(decoder_is_dw_conv):
        raise ValueError("TurboVAED config: decoder_is_dw_conv (depthwise convs) is not implemented")
    if not use_unpatchify:
        raise ValueError("TurboVAED config: use_unpatchify=false (the pixel-shuffle head) is not implemented")
    flags = zip(decoder_spatio_temporal_scaling, decoder_spatio_only, strict=True)
    temporal = sum(scales and not only_2d for scales, only_2d in flags)
    if 2**temporal != temporal_compression_ratio:
        raise ValueError(
            f"TurboVAED config: temporal_compression_ratio={temporal_compression_ratio} but the decoder has "
            f"{temporal} temporal x2 upsamplers (the window overlap trim uses the ratio)"
        )
    if min(chunks) < 1:
        raise ValueError(f"TurboVAED config: first_chunk_size and step_size must be >= 1, got {chunks}")
    if latent_channels != LATENT_CHANNELS:
        raise ValueError(
            f"TurboVAED config: latent_channels={latent_channels}; the de-normalisation tables are "
            f"Wan2.2's {LATENT_CHANNELS} channels"
        )


class TurboVideoDecoder(nn.Module):
    """Turbo-VAED behind the video codec's decode interface (`VideoCodec.decode`): normalised latents
    `[B, 48, T, h, w]` -> pixels `[B, 3, 4T-3, 16h, 16w]` in [-1, 1], float32.

    The latents are cast to the decoder's dtype first (bf16 as released), so the de-normalisation
    rounds as in the release. The clamp is the release's post-processing, which clamps
    `0.5 x + 0.5` to [0, 1]: the same pixels.
    """

    def __init__(self, model: TurboVAED):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.model.device, self.dtype)
        return self.model.decode(z).float().clamp(-1, 1)
