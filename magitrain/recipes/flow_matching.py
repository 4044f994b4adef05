"""Flow-matching training of MagiHuman on video + audio given text (base pretraining and fine-tuning).

Per sample: one noise level s shared by video and audio, `x_t = (1 - s) x0 + s eps`, and the
model regresses the velocity `eps - x0` of each modality. The text is dropped (empty prompt)
with `p_drop_text` so classifier-free guidance works at inference; with `p_image` the clean
frame-0 latent replaces the noisy one (image-to-video) and frame 0 leaves the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from magitrain.flow import training as fm

from .module import MagiHumanModule


@dataclass
class FlowMatchingConfig:
    p_drop_text: float = 0.1
    p_image: float = 0.3
    video_weight: float = 1.0
    audio_weight: float = 1.0
    s_buckets: tuple[float, ...] = (0.25, 0.5, 0.75)  # loss logged per s-interval between these edges


class FlowMatchingModule(MagiHumanModule):
    def __init__(self, *args, flow: FlowMatchingConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flow_config = flow or FlowMatchingConfig()

    def _draw(self, batch: dict) -> dict[str, Tensor]:
        """Per-sample noise, noise level and conditioning coin flips from the per-sample generators."""
        video, audio = batch["video_latent"], batch["audio_latent"]
        samples, seq_len = self.batch_shape(batch)
        draws = {"eps_video": [], "eps_audio": [], "s": [], "drop_text": [], "image": []}
        for gen in self.sample_generators(batch):
            draws["eps_video"].append(torch.randn(video.shape[1:], generator=gen, device=gen.device))
            draws["eps_audio"].append(torch.randn(audio.shape[1:], generator=gen, device=gen.device))
            draws["s"].append(fm.sample_sigmas(1, seq_len, generator=gen))
            coins = torch.rand(2, generator=gen, device=gen.device)
            draws["drop_text"].append(coins[0] < self.flow_config.p_drop_text)
            draws["image"].append(coins[1] < self.flow_config.p_image)
        out = {k: torch.stack(v).to(self.device) for k, v in draws.items()}
        out["s"] = out["s"].reshape(samples).float()
        return out

    def flow_loss(self, batch: dict) -> dict[str, Tensor]:
        x0_video = batch["video_latent"].float()
        x0_audio = batch["audio_latent"].float()
        d = self._draw(batch)
        s = d["s"]
        x_video = fm.interpolate(x0_video, d["eps_video"], s)
        x_audio = fm.interpolate(x0_audio, d["eps_audio"], s)

        # image-to-video: the clean frame-0 latent overwrites the noisy one and is not a target
        image = d["image"][:, None, None, None]
        x_video[:, :, 0] = torch.where(image, x0_video[:, :, 0], x_video[:, :, 0])
        frame_mask = torch.ones_like(x0_video[:, :1])  # [B, 1, T, H, W]
        frame_mask[:, :, 0] = (~image).float()[:, None]

        text_len = batch["text_len"].to(self.device).clone()
        text_len[d["drop_text"]] = 0  # the empty prompt: no text tokens enter the sequence

        v_video, v_audio = self.model(x_video, x_audio, batch["text_emb"], text_len=text_len)
        loss_video = fm.velocity_mse(v_video, fm.velocity_target(x0_video, d["eps_video"]), frame_mask)
        loss_audio = fm.velocity_mse(v_audio, fm.velocity_target(x0_audio, d["eps_audio"]))
        cfg = self.flow_config
        per_sample = cfg.video_weight * loss_video + cfg.audio_weight * loss_audio
        return {"loss": per_sample.mean(), "video": loss_video, "audio": loss_audio, "per_sample": per_sample, "s": s}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.flow_loss(batch)
        B = out["s"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=B)
        self.log("train/loss_video", out["video"].mean(), sync_dist=True, batch_size=B)
        self.log("train/loss_audio", out["audio"].mean(), sync_dist=True, batch_size=B)
        edges = (0.0, *self.flow_config.s_buckets, 1.0)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            in_bucket = (out["s"] >= lo) & (out["s"] < hi)
            if in_bucket.any():
                name = f"train/loss_s{lo:.2f}-{hi:.2f}"
                self.log(name, out["per_sample"][in_bucket].mean(), batch_size=int(in_bucket.sum()))
        return out["loss"]
