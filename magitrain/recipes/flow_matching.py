"""Flow-matching training of MagiHuman on video + audio given text (base pretraining and fine-tuning).

Per sample: one noise level s shared by video and audio, `x_t = (1 - s) x0 + s eps`, and the
model regresses the velocity `eps - x0` of each modality. A batch with voice references
(`data.voice_reference`) gives them to the model, clean, never in the loss. The text is dropped (empty prompt)
with `p_drop_text` so classifier-free guidance works at inference; with `p_image` the clean
frame-0 latent replaces the noisy one (image-to-video) and frame 0 leaves the loss. With
`conditioning` one modality of a sample enters clean (s = 0) and leaves the loss: audio-driven video
(`p_a2v`) or video-to-audio (`p_v2a`); `independent_sigmas` draws the audio's s apart from the video's.

A variant overrides the hooks (`video_source`: the s = 1 end x1; `audio_input`; `video_loss_mask`;
`reference_frame`; `model_kwargs`; `draw_sample` appends its draws): SR fine-tuning
(`magitrain.recipes.sr`) is this module with x1 the re-noised upsampled low-resolution latent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from magitrain.flow import training as fm

from .module import MagiHumanModule, voice_kwargs


@dataclass
class FlowMatchingConfig:
    p_drop_text: float = 0.1
    p_image: float = 0.3
    video_weight: float = 1.0
    audio_weight: float = 1.0
    s_buckets: int = 4  # loss logged per equal-width interval of s
    sigma_sampling: fm.SigmaSampling = field(default_factory=fm.SigmaSampling)
    conditioning: fm.Conditioning = field(default_factory=fm.Conditioning)  # a2v / v2a samples
    independent_sigmas: float = 0.0  # share of samples whose audio draws its own s

    def __post_init__(self):
        if not 0 <= self.independent_sigmas <= 1:
            raise ValueError(f"flow.independent_sigmas must lie in [0, 1], got {self.independent_sigmas}")


class FlowMatchingModule(MagiHumanModule):
    # a base model: validation samples with the released base sampler (32-step UniPC with CFG)
    validation_sampling = {"steps": 32, "sampler": "base"}

    def __init__(self, *args, flow: FlowMatchingConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flow_config = flow or FlowMatchingConfig()
        self.hparams["flow"] = asdict(self.flow_config)
        # what the trained network is sampled with (export's config.json, infer.py's default)
        self.hparams["sampling"] = {"sampler": "base", "steps": 32}
        self._s_window: Tensor | None = None  # loss sums and counts of the logging window
        self._window_step = 0  # the global step the window's last micro-batch saw

    def _draw(self, batch: dict) -> dict[str, Tensor]:
        """Per-sample draws (`draw_sample`) from the per-sample generators, stacked on the device,
        with each modality's noise level (`s_video`, `s_audio`) and the a2v / v2a masks."""
        per_sample = [self.draw_sample(gen, batch) for gen in self.sample_generators(batch)]
        out = {k: torch.stack([d[k] for d in per_sample]).to(self.device) for k in per_sample[0]}
        out["s"] = out["s"].reshape(len(per_sample)).float()
        cfg = self.flow_config
        if not (cfg.conditioning.enabled or cfg.independent_sigmas > 0):  # (nothing more drawn)
            none = torch.zeros_like(out["s"], dtype=torch.bool)
            return out | {"s_video": out["s"], "s_audio": out["s"], "a2v": none, "v2a": none}
        return self._draw_conditioning(batch, out)

    def _draw_conditioning(self, batch: dict, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """The conditioning options' draws, from per-sample generators of their own (stream
        "conditioning"): the noise, s and coins above are the same whatever these options are."""
        cfg, s = self.flow_config, out["s"]
        draws = []
        for gen in self.sample_generators(batch, "conditioning"):
            coins = torch.rand(2, generator=gen, device=gen.device)
            own_s = fm.sample_sigmas(1, self.noised_tokens(batch), gen, cfg.sigma_sampling)
            draws.append(torch.cat([coins, own_s]))
        mode, apart, own_s = torch.stack(draws).to(self.device).unbind(1)
        has_audio = batch.get("audio_mask", torch.ones_like(mode, dtype=torch.bool))
        a2v, v2a = cfg.conditioning.draw(mode, has_audio)
        s_audio = torch.where(apart < cfg.independent_sigmas, own_s, s)
        zero = torch.zeros_like(s)
        return out | {
            "s_video": torch.where(v2a, zero, s),
            "s_audio": torch.where(a2v, zero, s_audio),
            "a2v": a2v,
            "v2a": v2a,
            "image": out["image"] & ~v2a,  # a v2a sample's video is the clip itself, every frame
        }

    def noised_tokens(self, batch: dict) -> int:
        """Video + audio tokens of a sample: what the noise level's shift grows with (a clean
        modality counts too: the released sampler runs audio-driven clips at the same shift)."""
        return self.batch_shape(batch)[1] - batch["text_emb"].shape[1]

    def draw_sample(self, gen: torch.Generator, batch: dict) -> dict[str, Tensor]:
        """One sample's noise, noise level and conditioning coin flips, in a fixed order from its
        generator (a variant appends its own draws after these)."""
        video, audio = batch["video_latent"], batch["audio_latent"]
        eps_video = torch.randn(video.shape[1:], generator=gen, device=gen.device)
        eps_audio = torch.randn(audio.shape[1:], generator=gen, device=gen.device)
        s = fm.sample_sigmas(1, self.noised_tokens(batch), gen, self.flow_config.sigma_sampling)
        coins = torch.rand(2, generator=gen, device=gen.device)
        return {
            "eps_video": eps_video,
            "eps_audio": eps_audio,
            "s": s,
            "drop_text": coins[0] < self.flow_config.p_drop_text,
            "image": coins[1] < self.flow_config.p_image,
        }

    # ----- the hooks a flow-matching variant (SR fine-tuning) overrides -------------------------
    def video_source(self, batch: dict, draws: dict[str, Tensor]) -> Tensor:
        """x1, the s = 1 end of the video flow `x_s = (1 - s) x0 + s x1`: Gaussian noise here."""
        return draws["eps_video"]

    def audio_input(self, x0_audio: Tensor, draws: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(the model's audio input, its velocity target or None for no audio loss)."""
        x_audio = fm.interpolate(x0_audio, draws["eps_audio"], draws["s_audio"])
        return x_audio, fm.velocity_target(x0_audio, draws["eps_audio"])

    def reference_frame(self, batch: dict, x0_video: Tensor) -> Tensor:
        """The clean frame-0 latent of image-to-video: the batch's encoded reference image, or frame 0."""
        return batch["ref_latent"].float() if "ref_latent" in batch else x0_video[:, :, :1]

    def video_loss_mask(self, x0_video: Tensor, draws: dict[str, Tensor]) -> Tensor:
        """[B, 1, T, 1, 1]: 0 where the clean reference replaces the input (frame 0 of i2v samples)."""
        return fm.first_frame_mask(x0_video, draws["image"])

    def model_kwargs(self) -> dict:
        """Extra keyword arguments of the training forward (SR: the v1 text coordinates)."""
        return {}

    def flow_loss(self, batch: dict) -> dict[str, Tensor]:
        x0_video = batch["video_latent"].float()
        x0_audio = batch["audio_latent"].float()
        d = self._draw(batch)
        x1_video = self.video_source(batch, d)
        x_video = fm.interpolate(x0_video, x1_video, d["s_video"])  # (s = 0: exactly x0)
        x_audio, target_audio = self.audio_input(x0_audio, d)

        # image-to-video: the clean frame-0 latent overwrites the noisy one and is not a target
        frame_mask = self.video_loss_mask(x0_video, d)
        x_video = torch.where(frame_mask == 0, self.reference_frame(batch, x0_video), x_video)

        text_len = batch["text_len"].to(self.device)  # the empty prompt: no text tokens enter
        text_len = torch.where(d["drop_text"], torch.zeros_like(text_len), text_len)  # (no host sync)

        route = self.token_route(batch)  # TREAD (module.tread): None when off
        v_video, v_audio = self.model(
            x_video,
            x_audio,
            batch["text_emb"],
            text_len=text_len,
            route=route,
            **self.model_kwargs(),
            **voice_kwargs(batch),
        )
        seen = (~d["v2a"]).to(x0_video)  # the samples whose video is trained (v2a: given clean)
        loss_video = fm.velocity_mse(v_video, fm.velocity_target(x0_video, x1_video), frame_mask) * seen
        if target_audio is None:  # no audio loss; zeros keep the logged keys
            loss_audio = torch.zeros_like(loss_video)
        else:
            loss_audio = fm.velocity_mse(v_audio, target_audio)
        # clips without audio (data.missing_audio=mask) train video only, and leave the audio mean:
        # it averages over the clips that have audio, so silent ones do not dilute it; a2v samples
        # (their audio given clean) leave it likewise, as v2a samples leave the video mean
        heard = batch["audio_mask"].to(loss_audio) if "audio_mask" in batch else torch.ones_like(loss_audio)
        heard = heard * (~d["a2v"]).to(heard)
        loss_audio = loss_audio * heard
        cfg = self.flow_config
        audio_mean = loss_audio.sum() / heard.sum().clamp_min(1)  # 0 when no clip has audio
        video_mean = loss_video.sum() / seen.sum().clamp_min(1)
        loss = cfg.video_weight * video_mean + cfg.audio_weight * audio_mean
        return {
            "loss": loss,
            "video": loss_video,
            "audio": loss_audio,
            "seen": seen,
            "heard": heard,
            "a2v": d["a2v"],
            "v2a": d["v2a"],
            "per_sample": cfg.video_weight * loss_video + cfg.audio_weight * loss_audio,
            "s": torch.where(d["v2a"], d["s_audio"], d["s_video"]),  # the trained modality's (video's)
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.flow_loss(batch)
        self.log("train/loss", out["loss"], prog_bar=True, logger=False)  # this rank's, for the bar
        self._add_to_window(out)
        return out["loss"]

    def _add_to_window(self, out: dict[str, Tensor]) -> None:
        """Losses (overall, per modality, per s-interval) summed over the logging window on each
        rank; `on_train_batch_end` reduces and logs them."""
        n = self.flow_config.s_buckets
        sums, counts = fm.sigma_bucket_stats(out["s"], out["per_sample"], n)
        totals = [out[k].sum() for k in ("video", "audio", "seen", "heard", "a2v", "v2a")]
        samples = torch.full((1,), float(out["s"].shape[0]), device=sums.device)
        window = torch.cat([torch.stack(totals).detach().float(), samples, sums, counts])
        self._s_window = window if self._s_window is None else self._s_window + window

    def on_train_start(self) -> None:
        self._window_step = self.global_step  # a resumed run's windows end on the same steps

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After an optimiser step that ends a logging window (every `log_every_n_steps` global
        steps, across data epochs): the window's sums reduced across ranks in ONE collective and
        logged as means at the step's index.

        Keyed on the global step, not `batch_idx`: that restarts every data epoch, and an epoch
        shorter than the interval (the CPU demo's 8 batches, logging every 10) never logged.
        Written to the loggers directly: a bucket that gets no sample in a window must show no
        value, not the stale one Lightning's step metrics would repeat.
        """
        if self.global_step == self._window_step or self._s_window is None:
            return  # an accumulation micro-batch (or a skipped step): the window goes on
        self._window_step = self.global_step
        if self.global_step % self.trainer.log_every_n_steps:
            return
        n = self.flow_config.s_buckets
        window = self.trainer.strategy.reduce(self._s_window, reduce_op="sum").tolist()
        self._s_window = None
        (video, audio, seen, heard, a2v, v2a, count), sums = window[:7], window[7 : 7 + n]
        counts = window[7 + n :]
        video, audio = video / max(seen, 1.0), audio / max(heard, 1.0)  # over the samples trained
        cfg = self.flow_config
        means = {
            "train/loss": cfg.video_weight * video + cfg.audio_weight * audio,
            "train/loss_video": video,
            "train/loss_audio": audio,
        }
        if cfg.conditioning.enabled:  # the share of the window's samples given a clean modality
            means |= {"train/frac_a2v": a2v / count, "train/frac_v2a": v2a / count}
        means |= {
            f"train/loss_s{i / n:.2f}-{(i + 1) / n:.2f}": sums[i] / c for i, c in enumerate(counts) if c
        }
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(means, step=self.global_step - 1)  # the step that ran
