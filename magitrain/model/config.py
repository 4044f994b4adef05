"""Architecture configuration of the MagiHuman single-stream transformer, with presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class MagiHumanConfig:
    num_layers: int = 40
    hidden_size: int = 5120
    head_dim: int = 128
    num_heads_q: int = 40
    num_heads_kv: int = 8
    # MLP widths: swiglu7 layers project up to 2 * swiglu_hidden (interleaved glu/linear rows).
    swiglu_hidden: int = 13652
    gelu_hidden: int = 20480
    # Modality-specific ("sandwich") layers hold three stacked copies of every weight: video, audio, text.
    sandwich_layers: tuple[int, ...] = (0, 1, 2, 3, 36, 37, 38, 39)
    gelu7_layers: tuple[int, ...] = (0, 1, 2, 3)
    # Layers with frame-local attention for video queries (1080p SR model); empty = all global.
    local_attn_layers: tuple[int, ...] = ()
    frame_window: int = 11
    attn_gating: bool = True
    video_in_channels: int = 192  # 48 latent channels x patch 1x2x2
    audio_in_channels: int = 64
    text_in_channels: int = 3584
    latent_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Text positions: "v2" (base and distilled models, every text position 0) or "v1" (SR models,
    # text t-positions spread over [0, 1]). The forward call may override it.
    coords_style: str = "v2"
    activation_checkpointing: bool = False
    attn_backend: str = "auto"  # auto | sdpa | flash | flex

    def __post_init__(self):
        for name in ("sandwich_layers", "gelu7_layers", "local_attn_layers", "patch_size"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.num_heads_q % self.num_heads_kv:
            raise ValueError(
                f"num_heads_q ({self.num_heads_q}) must be a multiple of num_heads_kv ({self.num_heads_kv})"
            )
        if self.head_dim % 8:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 8 (3-axis RoPE bands)")
        for name in ("sandwich_layers", "gelu7_layers", "local_attn_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name} has layer indices {bad} outside [0, {self.num_layers})")
        if self.coords_style not in ("v1", "v2"):
            raise ValueError(f"coords_style must be 'v1' or 'v2', got {self.coords_style!r}")
        patch_volume = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        if self.video_in_channels != self.latent_channels * patch_volume:
            raise ValueError(
                f"video_in_channels ({self.video_in_channels}) must equal latent_channels x patch volume "
                f"({self.latent_channels} x {patch_volume})"
            )

    @property
    def rope_bands(self) -> int:
        """Frequencies per RoPE axis: 3 axes x 2 (sin, cos) x bands = 6 * bands = 3/4 of head_dim."""
        return self.head_dim // 8

    @property
    def qkv_rows(self) -> int:
        gate = self.num_heads_q if self.attn_gating else 0
        return (self.num_heads_q + 2 * self.num_heads_kv) * self.head_dim + gate

    def replace(self, **changes) -> MagiHumanConfig:
        return dataclasses.replace(self, **changes)

    def layer_params_per_token(self, index: int) -> int:
        """Parameters one token multiplies with in layer `index` (one modality copy of a sandwich layer)."""
        d = self.hidden_size
        mlp = 2 * d * self.gelu_hidden if index in self.gelu7_layers else 3 * d * self.swiglu_hidden
        return self.qkv_rows * d + self.num_heads_q * self.head_dim * d + mlp

    def active_params_per_token(self) -> int:
        """Parameters one token multiplies with: one modality copy in sandwich layers, no text head."""
        d = self.hidden_size
        total = sum(self.layer_params_per_token(i) for i in range(self.num_layers))
        return total + d * max(self.video_in_channels, self.audio_in_channels) + d * self.video_in_channels


# The 15B presets train with activation checkpointing: one 5 s 256p sample holds ~90 GB of
# activations without it (docs/benchmarks.md, "What fits").
_15B_TRAINING = dict(activation_checkpointing=True)


def magihuman_15b(**overrides) -> MagiHumanConfig:
    """The released daVinci-MagiHuman architecture of the base and distilled checkpoints (text "v2")."""
    return MagiHumanConfig(**{**_15B_TRAINING, **overrides})


def magihuman_15b_sr540(**overrides) -> MagiHumanConfig:
    """The released 540p SR model: the base architecture with the SR text coordinates ("v1")."""
    return MagiHumanConfig(**{**_15B_TRAINING, "coords_style": "v1", **overrides})


def sr1080_local_layers(num_layers: int) -> tuple[int, ...]:
    """The 1080p SR model's local layers: all but every fourth (3, 7, ..., 31), the last 8 local."""
    return tuple(i for i in range(num_layers) if not (i % 4 == 3 and i < 32))


def magihuman_15b_sr1080(**overrides) -> MagiHumanConfig:
    """The released 1080p SR model: local attention everywhere but layers 3, 7, ..., 31, window 11."""
    local = sr1080_local_layers(40)
    base = dict(_15B_TRAINING, local_attn_layers=local, frame_window=11, coords_style="v1")
    return MagiHumanConfig(**{**base, **overrides})


def golden_tiny(**overrides) -> MagiHumanConfig:
    """The tiny configuration of `shared/golden` (manifest `tiny_config.arch_base`)."""
    base = dict(
        num_layers=8,
        hidden_size=128,
        head_dim=32,
        num_heads_q=4,
        num_heads_kv=2,
        swiglu_hidden=340,
        gelu_hidden=512,
        sandwich_layers=(0, 1, 6, 7),
        gelu7_layers=(0, 1),
        text_in_channels=64,
    )
    base.update(overrides)
    return MagiHumanConfig(**base)


def tiny(**overrides) -> MagiHumanConfig:
    """A few layers and a small width with every feature of the 15B model, for tests and CPU demos."""
    base = dict(
        num_layers=4,
        hidden_size=64,
        head_dim=16,
        num_heads_q=4,
        num_heads_kv=2,
        swiglu_hidden=168,
        gelu_hidden=256,
        sandwich_layers=(0, 3),
        gelu7_layers=(0,),
        text_in_channels=64,
    )
    base.update(overrides)
    return MagiHumanConfig(**base)


def tiny_sr1080(**overrides) -> MagiHumanConfig:
    """`tiny` laid out as the 1080p SR model: local attention in all but every fourth layer, v1 text
    coordinates; a window of 1 latent frame (not 11) so that a toy clip is really cut by it."""
    base = dict(local_attn_layers=sr1080_local_layers(4), frame_window=1, coords_style="v1")
    return tiny(**{**base, **overrides})


PRESETS = {
    "magihuman_15b": magihuman_15b,
    "magihuman_15b_sr540": magihuman_15b_sr540,
    "magihuman_15b_sr1080": magihuman_15b_sr1080,
    "golden_tiny": golden_tiny,
    "tiny": tiny,
    "tiny_sr1080": tiny_sr1080,
}


def get_config(name: str, **overrides) -> MagiHumanConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
