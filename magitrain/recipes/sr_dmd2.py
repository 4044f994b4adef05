"""SR distillation (recipe=sr_dmd2_540p / sr_dmd2_1080p): DMD-2 of the released SR stage into a
1-2 step SR student.

`DMD2Module` unchanged in its roles (student, critic, frozen teacher; one read of the SR
checkpoint), optimisers, TTUR, EMA, clipping, non-finite guard, signals and exact resume; this
module changes only what the SR stage changes (REFERENCE §3):

- the flow's s = 1 end is the released SR source `x1 = a up(lr) + sqrt(1 - a^2) eps`, a = the
  re-noise coefficient at DDPM index `sr.noise_value` (220: 0.8389), fixed, as the released sampler
  starts (SR fine-tuning jitters a; a student learns the one start it will be given). The student's
  sampler starts there and runs `dmd.student_steps` on the shifted grid `flow_grid(steps)` (s in
  (0, 1], time of the SR stage: s = 1 is the source, not Gaussian noise), re-noising each x0
  prediction towards a fresh source; the score losses noise the student's samples towards a fresh
  source too, at levels drawn inside [dmd.score_lo, dmd.score_hi] of that same SR time;
- video is the only sampled modality: the audio input is `0.7 eps + 0.3 audio`, drawn once per
  sample and step and held fixed for every network call of the step, and there is no audio loss
  (the SR model's audio output is discarded at inference);
- the teacher runs as the released SR stage does, without CFG (`dmd.guidance: null`, one pass);
- text positions are v1 (the SR checkpoints'); image-to-video keeps the clean HR frame 0.

The student's sampler is recorded as `sampling: {sampler: distilled, steps, stage: sr}`: export's
config.json says it and `infer.py sr_ckpt=` samples the SR stage so by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from magitrain.errors import UserError
from magitrain.flow.schedules import sr_renoise_coefficient
from magitrain.flow.sr import upsample_latent, vp_renoise

from .dmd2 import DMD2Module, DMDConfig
from .sr import LowResolutionPairs, lr_size_of, sr_reference


@dataclass
class SRDistillConfig:
    noise_value: int = 220  # the source's re-noise index (a = 0.8389), as the released SR sampler
    audio_noise_scale: float = 0.7  # audio input `0.7 eps + 0.3 audio`, as released
    lr_size: str = "256p"  # raw media: LR pixels at this WxH (or preset), the base grid

    def __post_init__(self):
        if not 0 < self.noise_value < 1000 or not 0 <= self.audio_noise_scale <= 1:
            raise ValueError(
                "module.sr.noise_value must lie in (0, 1000) and module.sr.audio_noise_scale in [0, 1], "
                f"got {self.noise_value}, {self.audio_noise_scale}"
            )


class SRDMD2Module(LowResolutionPairs, DMD2Module):
    trains_on_prompts = False  # the LR latent is the condition: LR/HR pair shards (or raw media)

    def __init__(self, *args, sr: SRDistillConfig | None = None, dmd: DMDConfig | None = None, **kwargs):
        dmd = dmd or DMDConfig(student_steps=2, guidance=None)
        super().__init__(*args, dmd=dmd, **kwargs)
        self.sr_config = sr or SRDistillConfig()
        self.lr_size = lr_size_of(self.sr_config.lr_size, "module.sr.lr_size")
        self.a = float(sr_renoise_coefficient(self.sr_config.noise_value))
        for key, on in (("gan.enabled", dmd.gan.enabled), ("p_a2v > 0", dmd.p_a2v > 0)):
            if on:
                raise UserError(
                    f"module.dmd.{key} is not an SR distillation option: the SR stage's audio is a "
                    "fixed noised input and its video the only sample (set it off)"
                )
        self.hparams.update(
            sr=asdict(self.sr_config),
            # no base-stage default; the SR stage's (export's config.json, infer.py sr_ckpt=)
            sampling={"sampler": "distilled", "steps": dmd.student_steps, "stage": "sr"},
        )
        self.hparams["model"]["coords_style"] = "v1"  # what it trains with: export's config.json

    @property
    def validation_sampling(self) -> dict:
        raise UserError(
            "recipe=sr_dmd2_*: validation sampling of an SR student is not built yet: leave out "
            "callbacks=validation (export the student and run infer.py sr_ckpt=)"
        )

    def model_kwargs(self) -> dict:
        return {"coords_style": "v1"}  # the SR checkpoints' text positions, whatever the preset

    # ----- the step's context: the LR condition and the fixed audio input ------------------------
    def _context(self, batch: dict) -> dict:
        hr = batch["video_latent"]
        ref = {"ref_latent": sr_reference(batch, hr)}  # frame 0 at the SR grid
        ctx = super()._context({k: v for k, v in batch.items() if k != "ref_latent"} | ref)
        k = self.sr_config.audio_noise_scale
        audio = batch["audio_latent"].float().to(self.device)
        eps_audio = torch.stack(
            [
                torch.randn(audio.shape[1:], generator=g, device=g.device)
                for g in self.sample_generators(batch, "sr")
            ]
        ).to(self.device)
        lr_up = upsample_latent(batch["lr_video_latent"].float().to(self.device), hr.shape[2:])
        return ctx | {
            "shapes": {"video": ctx["shapes"]["video"]},  # the only sampled modality
            "audio_in": k * eps_audio + (1 - k) * audio,
            "lr_up": lr_up,
            "real": None,  # (the GAN term's; refused here)
        }

    def _audio_input(self, x: dict[str, Tensor], ctx: dict) -> Tensor:
        return ctx["audio_in"]

    def _source(self, ctx: dict):
        lr_up, a = ctx["lr_up"], torch.tensor(self.a, device=self.device)

        def source(modality: str, eps: Tensor) -> Tensor:
            return vp_renoise(lr_up, a, eps)

        return source
