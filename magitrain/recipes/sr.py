"""Latent super-resolution fine-tuning: flow matching from the released SR sampler's start to the HR latent.

The released SR stage (REFERENCE §3, `magitrain.flow.sr`) starts at `x1 = a up(lr) + sqrt(1 - a^2) eps`
(trilinear upsampling, a = 0.839) and runs 5 shifted UniPC steps to the HR latent. Training is
the flow-matching recipe with that x1 as the s = 1 end: `x_s = (1 - s) x_hr + s x1`, target
`x1 - x_hr`, a jittered around 0.839 so the model does not learn one exact noise level. The s
sampling mixes the 5-step shifted grid (the only s the sampler evaluates) into the shifted
logit-normal. Audio enters as `0.7 eps + 0.3 audio`, held fixed, with no audio loss (the SR
model's audio output is discarded at inference); text positions are v1 whatever the preset says.

The low-resolution latent comes from the shards (`lr_video_latent`, `encode_shards.py --sr`) or,
for raw media, is made on the fly: the HR pixels resized to exactly `lr_size` (the base stage's
grid, 448x256, that the sampler upsamples; the same resize `encode_shards.py --sr` makes) and encoded.
The LR size takes the HR clip's orientation, as inference sizes its base stage (`oriented_like`): a
portrait bucket gets a 256x448 LR clip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from magitrain.codecs.media import to_pixels
from magitrain.data.encode import resize_video
from magitrain.flow import training as fm
from magitrain.flow.schedules import DEFAULT_SHIFT, flow_grid, sr_renoise_coefficient
from magitrain.flow.sr import upsample_latent, vp_renoise
from magitrain.inference.shapes import oriented_like, parse_resolution

from .flow_matching import FlowMatchingConfig, FlowMatchingModule

RELEASED_A = float(sr_renoise_coefficient(220))  # 0.8389: DDPM step 220 of the zero-SNR table


class Source(Protocol):
    """The s = 1 end of the SR flow, from the upsampled LR latent: one scalar draw per sample."""

    def draw(self, gen: torch.Generator) -> Tensor: ...

    def __call__(self, lr_up: Tensor, eps: Tensor, param: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class RenoisedUpsample:
    """`x1 = a up(lr) + sqrt(1 - a^2) eps`, a ~ U(a - jitter, a + jitter); with `p_pure_noise`
    a sample gets a = 0, i.e. x1 = eps (a pure-noise source mixed in)."""

    a: float = RELEASED_A
    jitter: float = 0.03
    p_pure_noise: float = 0.0

    def __post_init__(self):
        if not 0 <= self.a - self.jitter <= self.a + self.jitter <= 1:
            raise ValueError(f"source a +- jitter must lie in [0, 1], got a={self.a}, jitter={self.jitter}")

    def draw(self, gen: torch.Generator) -> Tensor:
        u = torch.rand(2, generator=gen, device=gen.device)
        a = self.a + self.jitter * (2 * u[0] - 1)
        return torch.where(u[1] < self.p_pure_noise, torch.zeros_like(a), a)

    def __call__(self, lr_up: Tensor, eps: Tensor, param: Tensor) -> Tensor:
        return vp_renoise(lr_up, param.reshape(-1, *[1] * (lr_up.ndim - 1)), eps)


@dataclass
class SRConfig(FlowMatchingConfig):
    p_drop_text: float = 0.0  # the SR sampler runs without CFG
    audio_weight: float = 0.0  # no audio loss (the flag keeps the base logging)
    audio_noise_scale: float = 0.7  # audio input `0.7 eps + 0.3 audio`, as released
    source: Source = field(default_factory=RenoisedUpsample)
    grid_steps: int = 5  # the SR sampler's steps: s on its shifted grid with `grid_fraction`
    grid_fraction: float = 0.5
    grid_shift: float = DEFAULT_SHIFT
    # raw media: LR pixels at this WxH (or preset), turned to each clip's orientation: the base grid
    lr_size: str = "256p"
    sigma_sampling: fm.SigmaSampling = field(
        default_factory=lambda: fm.SigmaSampling(base_shift=DEFAULT_SHIFT, max_shift=DEFAULT_SHIFT)
    )


class LowResolutionPairs:
    """A recipe mixin (before the LightningModule) for LR/HR pair batches: `lr_video_latent` from
    the shards, or for raw media made from the HR pixels resized to `self.lr_size` (width, height;
    turned to each clip's orientation), and every pair checked. SR fine-tuning and SR distillation."""

    lr_size: tuple[int, int]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        raw = "video" in batch  # (raw media; a prompt batch has neither and the frame refuses it)
        if not (raw and self.codecs is not None):
            out = super().on_after_batch_transfer(batch, dataloader_idx)
        else:
            height, width = batch["video"].shape[-2:]
            lr_width, lr_height = oriented_like(self.lr_size, (width, height))
            batch = {**batch, "lr_pixels": resize_video(batch["video"], (lr_height, lr_width))}
            with torch.no_grad(), self.codecs.on_device():  # (codecs.offload: one visit for both)
                out = super().on_after_batch_transfer(batch, dataloader_idx)
                out["lr_video_latent"] = self.codecs.video.encode(to_pixels(batch["lr_pixels"]))
        if "lr_video_latent" not in out:
            raise ValueError(
                f"{type(self).__name__} needs lr_video_latent in every sample of a batch: make the "
                "shards with data_tools/encode_shards.py --sr HxW, or train on raw shards (data=raw) "
                "to encode it on the fly"
            )
        check_pair(out["lr_video_latent"], out["video_latent"])
        return out


def lr_size_of(value: str, key: str) -> tuple[int, int]:
    """(width, height) of the on-the-fly LR clip; a bad size is refused now, not at step 1."""
    try:
        return parse_resolution(value)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


def sr_reference(batch: dict, hr: Tensor) -> Tensor:
    """Frame 0 at the SR grid: a reference latent encoded at another size is not used."""
    ref = batch.get("ref_latent")
    if ref is not None and ref.shape[-2:] == hr.shape[-2:]:
        return ref.float()
    return hr[:, :, :1]


class SRFineTuneModule(LowResolutionPairs, FlowMatchingModule):
    """Validation (the validation callback): the frozen base model at `validation_base` (released
    layout, e.g. /ckpt/distill) generates the base stage (`validation_sampler`, `validation_steps`),
    the SR network being trained refines it to `validation_size` (WxH, e.g. 896x512)."""

    def __init__(
        self,
        *args,
        flow: SRConfig | None = None,
        validation_base: str | None = None,
        validation_steps: int = 8,
        validation_sampler: str = "distilled",
        validation_size: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, flow=flow or SRConfig(), **kwargs)
        self.validation_base, self.validation_size = validation_base, validation_size
        self.validation_steps, self.validation_sampler = validation_steps, validation_sampler
        object.__setattr__(self, "_base_network", None)  # frozen, outside the state dict
        cfg = self.flow_config
        if not isinstance(cfg, SRConfig):
            raise TypeError(f"SRFineTuneModule needs flow: SRConfig, got {type(cfg).__name__}")
        if cfg.audio_weight:
            raise ValueError("flow.audio_weight must be 0 for SR: its audio output is discarded")
        if cfg.conditioning.enabled or cfg.independent_sigmas:
            raise ValueError(
                "flow.conditioning and flow.independent_sigmas are not SR options: its audio is a fixed "
                "noised input (0.7 eps + 0.3 audio) and not trained"
            )
        self.hparams["flow"] = {**asdict(cfg), "source": repr(cfg.source)}
        self.hparams["model"]["coords_style"] = "v1"  # what it trains with: export's config.json
        self.hparams["sampling"] = None  # the SR stage has its own sampler: no base-stage default
        self.lr_size = lr_size_of(cfg.lr_size, "flow.lr_size")
        self._grid = flow_grid(cfg.grid_steps, cfg.grid_shift)[1][:-1].tolist()  # s the sampler evaluates

    # ----- validation: the frozen base model, then this SR network -----------------------------
    @property
    def validation_sampling(self) -> dict:
        if not (self.validation_base and self.validation_size):
            raise ValueError(
                "SR validation needs module.validation_base=PATH (the frozen base or distilled model "
                "the SR model refines, released layout) and module.validation_size=WxH (the SR size)"
            )
        return {
            "steps": self.validation_steps,
            "sampler": self.validation_sampler,
            "sr": self.validation_size,
        }

    def validation_pipeline(self, network, precision: str):
        from magitrain.checkpoint import load_official
        from magitrain.checkpoint.official import read_config
        from magitrain.inference import MagiHumanPipeline
        from magitrain.model import MagiHumanDiT

        if self._base_network is None:
            config = read_config(self.validation_base) or self.model_config.replace(
                coords_style="v2", local_attn_layers=()
            )
            base = load_official(MagiHumanDiT(config), self.validation_base).to(self.device).eval()
            object.__setattr__(self, "_base_network", base.requires_grad_(False))
        offload = "codecs" if self.codecs.offload else "none"
        return MagiHumanPipeline(
            self._base_network,
            self.codecs,
            sr_model=network,
            device=self.device,
            precision=precision,
            offload=offload,
        )

    # ----- draws: the base draws, then the source's, then the grid coin --------------------------
    def draw_sample(self, gen: torch.Generator, batch: dict) -> dict[str, Tensor]:
        cfg = self.flow_config
        out = super().draw_sample(gen, batch)
        out["eps_source"] = torch.randn(batch["video_latent"].shape[1:], generator=gen, device=gen.device)
        out["source"] = cfg.source.draw(gen)
        u = torch.rand(2, generator=gen, device=gen.device)
        # a tensor made here and gathered from (no indexing by a value): the planner's fake step runs it
        grid = torch.tensor(self._grid, dtype=torch.float32, device=u.device)
        on_grid = grid.gather(0, (u[1:] * len(grid)).long().clamp(max=len(grid) - 1))[0]
        out["s"] = torch.where(u[0] < cfg.grid_fraction, on_grid.to(out["s"]), out["s"])
        return out

    # ----- the flow-matching hooks -------------------------------------------------------------
    def video_source(self, batch: dict, draws: dict[str, Tensor]) -> Tensor:
        hr = batch["video_latent"]
        lr_up = upsample_latent(batch["lr_video_latent"].float(), hr.shape[2:])
        return self.flow_config.source(lr_up, draws["eps_source"], draws["source"])

    def audio_input(self, x0_audio: Tensor, draws: dict[str, Tensor]) -> tuple[Tensor, None]:
        k = self.flow_config.audio_noise_scale
        return k * draws["eps_audio"] + (1 - k) * x0_audio, None

    def reference_frame(self, batch: dict, x0_video: Tensor) -> Tensor:
        return sr_reference(batch, x0_video)

    def model_kwargs(self) -> dict:
        return {"coords_style": "v1"}  # the SR checkpoints' text positions, whatever the preset


def check_pair(lr: Tensor, hr: Tensor) -> None:
    """An LR/HR pair covers the same clip: same samples, channels and latent frames."""
    if lr.shape[:3] != hr.shape[:3] or lr.ndim != 5:
        raise ValueError(
            f"lr_video_latent {tuple(lr.shape)} does not pair with video_latent {tuple(hr.shape)}: "
            "need the same batch, channels and latent frames"
        )
