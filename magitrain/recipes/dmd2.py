"""DMD-2 distillation of MagiHuman into an 8-step audio+video student (REFERENCE §5).

Three MagiHumanDiTs by role: the student (the frame's `self.model`, so the EMA callback, export and
validation see it), the fake-score critic, and the frozen teacher, stored with bf16 block linears
and run under bf16 autocast, kept out of checkpoints (it is rebuilt from `teacher=`).

Step semantics: one `training_step` is one generator iteration on one batch: `ttur` critic
updates, then one student update. Only the student's optimiser steps through Lightning, so
`trainer.global_step` counts *generator* updates: `trainer.max_steps`, checkpoint and validation
cadence, the EMA callback (which runs after the student's update, never after a critic step), the
LR schedules and the per-sample noise seeds all count generator steps. The critic's optimiser
steps directly and is counted in `train/critic_step`.

A non-finite update of either network is skipped (its gradients dropped, so neither the weights
nor the optimiser state change). A skipped student update still ends the generator step, as the
base recipe's skipped steps do: `global_step` and both schedules advance together, the EMA leaves
its shadow alone, and checkpoints and signals see the step (the weights are the last finite
ones). Each network counts its own consecutive skips; more than `dmd.max_nonfinite_steps` in a
row stop the run with `TrainingDiverged`.

The losses and the backward simulation are `magitrain.flow.dmd`'s; this module closes the
conditioning (text, negative prompt, reference frame, the clean audio of audio-driven samples) into
velocity callables.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from magitrain.data.prompts import NEGATIVE_FILE, latent_geometry, negative_beside, read_negative
from magitrain.errors import UserError
from magitrain.flow import Guidance, flow_grid
from magitrain.flow import dmd as core
from magitrain.flow import training as fm
from magitrain.model import MagiHumanDiT

from .dmd_gan import DMDGAN, GANConfig
from .module import MagiHumanModule, voice_kwargs
from .optim import OptimConfig, build_adamw, lr_lambda

log = logging.getLogger("magitrain")
LR_RATIO_TOLERANCE = 10.0  # how far the critic's / student's lr may be from dmd.critic_lr_ratio


@dataclass
class DMDConfig:
    student_steps: int = 8  # the student's grid: flow_grid(student_steps), the released 8 steps
    ttur: int = 5  # critic updates per generator update
    score_shift: float = 5.0  # score noise levels: shifted uniform, clamped to [score_lo, score_hi]
    score_lo: float = 0.02
    score_hi: float = 0.98
    video_weight: float = 1.0
    audio_weight: float = 1.0
    # teacher CFG, standard form u + g (c - u); None: the conditional teacher alone, one pass, no
    # negative prompt (the released SR stage runs so)
    guidance: Guidance | None = field(default_factory=Guidance)
    teacher_dtype: str = (
        "bfloat16"  # storage of the teacher's block linears (bfloat16: run under bf16 autocast)
    )
    p_image: float = 0.0  # share of samples conditioned on their frame-0 latent (image-to-video)
    # share of samples whose student learns audio-driven sampling: the clip's clean audio is every
    # network's audio input (student, teacher, critic) and out of both losses
    p_a2v: float = 0.0
    # the batch's voice references (data.voice_reference on latent shards) given to the student,
    # the teacher and the critic alike: the student learns to keep the teacher's reference voice
    voice_reference: bool = False
    student_clip: float = 10.0  # per-optimiser gradient clipping (total norm)
    critic_clip: float = 10.0
    max_nonfinite_steps: int = 10  # consecutive skipped non-finite updates before the run stops
    # the frozen teacher waits in (pinned) host memory and visits the device for its forwards;
    # FSDP2: its shards stay in host memory (CPUOffloadPolicy). Same results, less device memory.
    teacher_offload: bool = False
    # the teacher's unconditional prompt without codecs: a negative.safetensors (data/prompts.py);
    # null: the one beside the shards (encode_shards.py writes it). With codecs: theirs, encoded
    negative_emb: str | None = None
    gan: GANConfig = field(default_factory=GANConfig)  # the optional GAN term (dmd_gan.py)
    # the critic's lr over the student's that the rates are tuned for; rates more than 10x off it
    # get a warning (an override of one optimiser's rate leaves the other's behind)
    critic_lr_ratio: float = 0.2
    # every this many generator steps: log each network's update norm (from a host copy of its
    # trainable weights taken before its step: no device memory); 0: never
    monitor_every: int = 10

    def __post_init__(self):
        self.gan = GANConfig.of(self.gan)
        if isinstance(
            self.guidance, Mapping
        ):  # a plain mapping from the config: checkpoints load weights-only
            self.guidance = Guidance(
                **{k: float(v) if k != "switch_t" else int(v) for k, v in self.guidance.items()}
            )
        if self.teacher_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dmd.teacher_dtype must be bfloat16 or float32, got {self.teacher_dtype!r}")
        if self.critic_lr_ratio <= 0 or self.monitor_every < 0:
            raise ValueError(
                "dmd.critic_lr_ratio must be > 0 and dmd.monitor_every >= 0, "
                f"got {self.critic_lr_ratio}, {self.monitor_every}"
            )
        if not 0 <= self.p_a2v <= 1:
            raise ValueError(f"dmd.p_a2v must lie in [0, 1], got {self.p_a2v}")
        if self.ttur < 1 or self.student_steps < 1:
            raise ValueError(
                f"dmd.ttur and dmd.student_steps must be >= 1, got {self.ttur}, {self.student_steps}"
            )


class DMD2Module(MagiHumanModule):
    validation_sampling = {"steps": 8, "sampler": "distilled"}  # the student is an 8-step model
    trains_on_prompts = True  # the student generates its samples: text + geometry suffice

    def __init__(
        self,
        *args,
        teacher: str | None = None,
        student_init: str | None = None,
        critic_init: str | None = None,
        critic_optim: OptimConfig | None = None,
        dmd: DMDConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.dmd_config = dmd or DMDConfig()
        self.critic_optim_config = critic_optim or OptimConfig(lr=4e-7, betas=(0.0, 0.999))
        self.teacher_path, self.student_init, self.critic_init = teacher, student_init, critic_init
        self.hparams.update(
            teacher=teacher,
            student_init=student_init,
            critic_init=critic_init,
            critic_optim=asdict(self.critic_optim_config),
            dmd=asdict(self.dmd_config),
            # the student's sampler (export's config.json, infer.py's default)
            sampling={"sampler": "distilled", "steps": self.dmd_config.student_steps},
        )
        self.critic: MagiHumanDiT | None = None
        object.__setattr__(self, "teacher", None)  # frozen, rebuilt from its path: not in checkpoints
        self._negative: tuple[Tensor, Tensor] | None = None
        self.gan: DMDGAN | None = None  # the GAN term's head: trained with the critic
        self._teacher_residency = None  # teacher_offload off FSDP2: a StageResidency
        self._built: dict[str, nn.Module] = {}  # configure_model's networks by source path
        self._nonfinite = {"student": 0, "critic": 0}  # consecutive skipped updates per network
        self._critic_steps = 0
        self._update_norms: dict[str, float] = {}  # of this generator step, when it is measured
        _check_lr_ratio(self.optim_config.lr, self.critic_optim_config.lr, self.dmd_config.critic_lr_ratio)

    # ----- networks -------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if not self.teacher_path:
            raise ValueError(
                "the DMD-2 recipe needs teacher=PATH (a released-layout checkpoint, e.g. /ckpt/base)"
            )
        # the student comes first and keeps float32; a later network copies the first one built from
        # its source, so each checkpoint on disk is read once (the teacher's once, whatever inits)
        self.init_path = self.student_init or self.teacher_path
        super().configure_model()
        self._built = {self.init_path: self.model}
        self.critic = self._sibling(self.critic_init or self.teacher_path, trainable=True)
        if self.dmd_config.gan.enabled:
            self.gan = DMDGAN(self.dmd_config.gan, self.critic, seed=self.seed)
            if self.device_mesh is not None:
                from magitrain.parallel import shard_beside

                shard_beside(self.gan.head, self.device_mesh)
        storage = getattr(torch, self.dmd_config.teacher_dtype)
        # FSDP2 offloads the teacher's shards itself; elsewhere on_fit_start sets up its residency
        offload = self.dmd_config.teacher_offload
        parallel = replace(self.parallel_config, cpu_offload=True) if offload else None
        teacher = self._sibling(self.teacher_path, trainable=False, storage_dtype=storage, parallel=parallel)
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self._built = {}

    def _sibling(
        self, path: str, trainable: bool, storage_dtype: torch.dtype | None = None, parallel=None
    ) -> MagiHumanDiT:
        """A network from `path`: read from disk the first time, then copied from the network built
        from it before in `configure_model` (the same sharding)."""
        source = self._built.get(path)
        if source is None:
            self._built[path] = self.build_network(path, trainable, storage_dtype, parallel)
            return self._built[path]
        network = self.build_network(None, trainable, storage_dtype, parallel)
        with torch.no_grad():
            for mine, theirs in zip(network.state_dict().values(), source.state_dict().values(), strict=True):
                # local shards: an offloaded teacher's live in host memory, the student's on the device
                _local(mine).copy_(_local(theirs))
        return network

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if "DeepSpeed" in type(strategy).__name__:
            raise ValueError(
                "the DMD-2 recipe trains two networks with two optimisers, and DeepSpeed drives one "
                "optimiser per engine: use strategy=ddp or strategy=fsdp2"
            )
        if hasattr(strategy, "_ddp_kwargs"):
            # each backward reaches one network (critic or student): DDP must not wait for the other
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        # a missing negative prompt file stops the run before its first step
        if self.codecs is None and self.dmd_config.guidance is not None:
            self.negative_prompt(1)
        if not self.dmd_config.teacher_offload:
            self.teacher.to(self.device)
        elif self.device_mesh is None and self._teacher_residency is None:
            from magitrain.inference.residency import StageResidency

            self._teacher_residency = StageResidency(self.device, {"teacher": [self.teacher]})

    def resident(self, network: nn.Module):
        """A context in which `network` is on the device (the offloaded teacher visits it)."""
        if network is self.teacher and self._teacher_residency is not None:
            return self._teacher_residency.stage("teacher")
        return nullcontext()

    @property
    def _critic_side(self) -> nn.Module:
        """What the critic's optimiser steps: the critic, and the GAN head when there is one."""
        return self.critic if self.gan is None else nn.ModuleList([self.critic, self.gan])

    # ----- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 0
        # (Lightning itself refuses trainer.gradient_clip_val under manual optimisation)
        optimizers, schedules = [], []
        for params, cfg in (
            (self.model.parameters(), self.optim_config),
            (self._critic_side.parameters(), self.critic_optim_config),
        ):
            opt = build_adamw(params, cfg, self.device)
            optimizers.append(opt)
            schedules.append(torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.total_steps or total)))
        return optimizers, schedules

    def on_before_optimizer_step(self, optimizer) -> None:
        """Grad norms are logged per network by `_update` (the frame's hook would log the student's)."""

    def _update(self, optimizer, network: nn.Module, clip: float, name: str, measure: bool = False) -> bool:
        """Clip, log the norm, and step unless it is non-finite: then drop the gradients and step
        anyway, which changes nothing (AdamW skips parameters without gradients) but lets a
        Lightning optimiser count the step. The norm is the same on every rank: all skip alike.
        `measure`: also keep the norm of the step's change of the weights in `self._update_norms`."""
        params = [p for p in network.parameters() if p.grad is not None]
        before = _host_copy(params) if measure else None
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.log(f"train/grad_norm_{name}", norm, on_step=True, on_epoch=False)
        finite = bool(torch.isfinite(norm))
        if finite:
            self._nonfinite[name] = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self._nonfinite[name] += 1
            self.log(
                f"train/nonfinite_skipped_{name}", float(self._nonfinite[name]), on_step=True, on_epoch=False
            )
            if self._nonfinite[name] > self.dmd_config.max_nonfinite_steps:
                from magitrain.callbacks.nonfinite import TrainingDiverged, _newest_checkpoint

                newest = _newest_checkpoint(self._trainer) if self._trainer is not None else "none"
                raise TrainingDiverged(
                    f"training diverged: {self._nonfinite[name]} consecutive non-finite {name} gradients "
                    f"(module.dmd.max_nonfinite_steps={self.dmd_config.max_nonfinite_steps}); the weights "
                    f"were not updated by them. Last good checkpoint: {newest}"
                )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if before is not None:
            self._update_norms[f"train/update_norm_{name}"] = float(_change_norm(params, before))
        return finite

    def _log_update_norms(self, step: int) -> None:
        """Straight to the loggers, on this generator step's row: `self.log` would repeat the last
        value on every step between two measured ones. (The norms are global: rank zero logs.)"""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(self._update_norms, step=step)
        self._update_norms = {}

    # ----- conditioning ---------------------------------------------------------------------
    def negative_prompt(self, batch: int) -> tuple[Tensor, Tensor]:
        """The teacher's unconditional branch, the negative prompt, cached: encoded once by the codecs,
        or, without codecs, read from `dmd.negative_emb` or the `negative.safetensors` beside the
        shards (the same prompt the codecs' validation samples use)."""
        if self._negative is None:
            if self.codecs is not None:
                with self.codecs.on_device():
                    emb, length = self.codecs.text.encode_negative(1)
            else:
                emb = read_negative(self._negative_path(), self.model_config.text_in_channels)[None]
                length = torch.tensor([emb.shape[1]])
            self._negative = (emb.float().to(self.device), length.to(self.device))
        emb, length = self._negative
        return emb.expand(batch, -1, -1), length.expand(batch)

    def _negative_path(self) -> str:
        if self.dmd_config.negative_emb:
            return self.dmd_config.negative_emb
        specs = getattr(self._trainer.datamodule, "dataset_specs", []) if self._trainer is not None else []
        found = negative_beside([url for spec in specs for url in spec.urls])
        if found is None:
            raise UserError(
                "the DMD-2 teacher's unconditional branch needs the negative prompt, and this run has "
                f"no codecs and no {NEGATIVE_FILE} beside its shards: set codecs=NAME (it is encoded "
                f"once), or module.dmd.negative_emb=PATH (a {NEGATIVE_FILE}, written by "
                "data_tools/encode_shards.py beside the shards it encodes)"
            )
        return str(found)

    def _velocity(
        self, network, ctx: dict, prompt: tuple | None = None, bf16: bool | None = None, route=None
    ):
        """The core's velocity callable of one network, given the step's context and `prompt`
        (embeddings, lengths; default the batch's text). Image-to-video: frame 0 enters as the clean
        reference, and its velocity is the exact `(x_t - ref) / s`, so every x0 prediction holds the
        reference there: the frame carries no gradient and no loss in both losses. Audio-driven
        samples: their clean audio is the audio input of every call (their audio velocity is out of
        both losses, `ctx["scored"]`).

        `bf16`: None runs the network in the step's own precision (trainer.precision's autocast,
        which an `autocast(enabled=False)` would switch off); True under bf16 autocast, False in
        float32 whatever the trainer's precision (a float32 teacher: exact).

        `route` (TREAD, `module.tread`): the forwards with grad route their tokens (the student's
        exit step, the critic's own loss); no-grad rollouts, the teacher and the critic's score of
        the generator loss never do."""

        text, text_len = prompt or (ctx["text"], ctx["text_len"])
        frame_mask, reference = ctx["mask"], ctx["ref"]

        def velocity(x: dict[str, Tensor], s: Tensor) -> dict[str, Tensor]:
            video = torch.where(frame_mask == 0, reference, x["video"])
            autocast = (
                nullcontext()
                if bf16 is None
                else torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
            )
            routed = route if torch.is_grad_enabled() else None
            with autocast:
                v_video, v_audio = network(
                    video,
                    self._audio_input(x, ctx),
                    text,
                    text_len=text_len,
                    route=routed,
                    **self.model_kwargs(),
                    **ctx["voice"],
                )
            exact = (x["video"] - reference) / s.reshape(-1, 1, 1, 1, 1)
            out = {"video": torch.where(frame_mask == 0, exact, v_video.float()), "audio": v_audio.float()}
            return {m: out[m] for m in x}  # a modality not sampled (SR's fixed audio) has no velocity

        return velocity

    def _audio_input(self, x: dict[str, Tensor], ctx: dict) -> Tensor:
        """Every network's audio input: the sampled audio, or an audio-driven sample's clean audio."""
        if ctx["a2v"] is None:
            return x["audio"]
        return torch.where(ctx["a2v"][:, None, None], ctx["audio"], x["audio"])

    def model_kwargs(self) -> dict:
        """Keyword arguments of every network call (SR: v1 text coordinates)."""
        return {}

    def _guided_teacher(self, ctx: dict):
        g = self.dmd_config.guidance
        cond = self._velocity(self.teacher, ctx, bf16=self._teacher_bf16)
        if g is None:

            def conditional(x, s):
                with self.resident(self.teacher):
                    return cond(x, s)

            return conditional
        negative = self.negative_prompt(ctx["text"].shape[0])
        uncond = self._velocity(self.teacher, ctx, negative, bf16=self._teacher_bf16)

        def velocity(x, s):
            with self.resident(self.teacher):
                c, u = cond(x, s), uncond(x, s)
            t = (s * 1000).reshape(-1, 1, 1, 1, 1)
            video_scale = torch.where(t > g.switch_t, g.video_high, g.video_low)
            return {
                "video": u["video"] + video_scale * (c["video"] - u["video"]),
                "audio": u["audio"] + g.audio * (c["audio"] - u["audio"]),
            }

        return velocity

    def _critic_for_loss(self, ctx: dict, route=None):
        """The critic's velocity callable for its own loss. Image-to-video: frame 0 is exact (zero
        error), so the batch mean weighs a conditioned sample's video by (T-1)/T; its video gradient
        is scaled by T/(T-1), so each sample weighs as the mean over its own free frames (the base
        recipe's masked `velocity_mse`). Values, and so the logged losses, are unchanged. (The
        generator loss needs no such step: its per-sample normaliser is scaled by the same (T-1)/T
        and the two cancel exactly in its gradient; docs/training.md.)"""
        critic = self._velocity(self.critic, ctx, route=route)
        frames = ctx["mask"].flatten(1)
        weight = (frames.shape[1] / frames.sum(1).clamp_min(1)).reshape(-1, 1, 1, 1, 1)  # (T=1: 1)

        def velocity(x, s):
            v = critic(x, s)
            video = v["video"]
            return v | {"video": video.detach() + weight * (video - video.detach())}

        return velocity

    @property
    def _teacher_bf16(self) -> bool:
        return self.dmd_config.teacher_dtype == "bfloat16"

    def _context(self, batch: dict) -> dict:
        """What a step's draws and velocity callables need. The data gives the text and the clip
        geometry; real latents (`video_latent`, `audio_latent`) only the GAN term and, as the
        reference frame of image-to-video, `ref_latent` or the clip's frame 0 (docs/training.md)."""
        (C, T, H, W), audio_shape = latent_geometry(batch)
        real = "video_latent" in batch
        if self.gan is not None and not real:
            raise UserError(
                "module.dmd.gan.enabled needs real latents, and the batch has no video_latent "
                "(prompt shards): train on latent shards or set module.dmd.gan.enabled=false"
            )
        if "ref_latent" in batch:
            ref = batch["ref_latent"].float()
        elif real:
            ref = batch["video_latent"][:, :, :1].float()
        elif self.dmd_config.p_image > 0:
            raise UserError(
                "module.dmd.p_image > 0 needs a reference frame, and the prompt batch has no "
                "ref_latent: set module.dmd.p_image=0 for prompt shards"
            )
        else:
            ref = torch.zeros(1, C, 1, H, W, device=self.device)
        B = batch["text_emb"].shape[0]
        gens = self.sample_generators(batch)
        image = torch.stack(
            [torch.rand((), generator=g, device=g.device) < self.dmd_config.p_image for g in gens]
        )
        frames = torch.empty(B, 1, T, 1, 1, device=self.device)  # (the mask reads only its shape)
        a2v = self._audio_driven(batch)
        return {
            "gens": gens,
            "text": batch["text_emb"],
            "text_len": batch["text_len"].to(self.device),
            "mask": fm.first_frame_mask(frames, image.to(self.device)),
            "ref": ref.expand(B, C, 1, H, W),
            "shapes": {"video": (C, T, H, W), "audio": audio_shape},
            "real": {"video": batch["video_latent"], "audio": batch["audio_latent"]} if real else None,
            # the GAN's audio pools leave out clips without audio (data.missing_audio=mask)
            "heard": batch["audio_mask"].to(self.device) if "audio_mask" in batch else None,
            "a2v": a2v,  # [B] bool or None (p_a2v = 0): the samples given their clean audio ...
            "audio": None if a2v is None else batch["audio_latent"].float().to(self.device),
            "scored": None if a2v is None else {"audio": ~a2v},  # ... which leaves both losses
            "voice": self._voice(batch),  # every network's reference audio (none: {})
        }

    def _voice(self, batch: dict) -> dict:
        given = "ref_audio_latent" in batch
        if given != self.dmd_config.voice_reference:
            raise UserError(
                "module.dmd.voice_reference=true needs voice references in the batches: set "
                "data.voice_reference.p > 0 (latent shards)"
                if self.dmd_config.voice_reference
                else "the batches carry voice references (data.voice_reference.p > 0): set "
                "module.dmd.voice_reference=true to give them to the networks"
            )
        return voice_kwargs(batch)

    def _audio_driven(self, batch: dict) -> Tensor | None:
        """The audio-driven samples [B] (never a clip without audio), from coins of a stream of their
        own, so every other draw of the step is the same whatever `p_a2v` is; None at p_a2v = 0."""
        p = self.dmd_config.p_a2v
        if p == 0:
            return None
        if "audio_latent" not in batch:
            raise UserError(
                "module.dmd.p_a2v > 0 drives the student with the clips' audio, and the prompt batch "
                "has no audio_latent: train on latent shards or set module.dmd.p_a2v=0"
            )
        gens = self.sample_generators(batch, "conditioning")
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in gens]).to(self.device)
        has_audio = batch.get("audio_mask", torch.ones_like(u, dtype=torch.bool))
        return fm.Conditioning(p_a2v=p).draw(u, has_audio)[0]

    def _draw(self, ctx: dict) -> dict[str, Tensor]:
        """Fresh per-sample Gaussians of every modality, from the per-sample generators."""
        return {
            m: torch.stack([torch.randn(shape, generator=g, device=g.device) for g in ctx["gens"]]).to(
                self.device
            )
            for m, shape in ctx["shapes"].items()
        }

    def _exit_index(self, phase: int) -> int:
        """The same on every rank: drawn from a generator seeded by (seed, generator step, phase)."""
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/exit/{self.global_step}/{phase}".encode()))
        return int(torch.randint(0, self.dmd_config.student_steps, (1,), generator=g))

    def _source(self, ctx: dict) -> core.Source | None:
        """The flow's s = 1 end made of a fresh N(0, 1) draw (None: the draw itself)."""
        return None

    def _ends(self, ctx: dict) -> dict[str, Tensor]:
        """Fresh draws of the flow's s = 1 end: the student's start, the score losses' noise."""
        draws, source = self._draw(ctx), self._source(ctx)
        return draws if source is None else {m: source(m, d) for m, d in draws.items()}

    def _simulate(self, ctx: dict, phase: int, route=None) -> dict[str, Tensor]:
        student = self._velocity(self.model, ctx, route=route)
        sigmas = flow_grid(self.dmd_config.student_steps)[1][:-1].tolist()
        noise = self._ends(ctx)
        # re-noising from the per-sample generators: DDP draws what one process would
        return core.simulate(
            student, noise, sigmas, self._exit_index(phase), generator=ctx["gens"], source=self._source(ctx)
        )

    def _score_draw(self, ctx: dict) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.dmd_config
        s = torch.cat(
            [
                core.score_sigmas(1, generator=g, shift=cfg.score_shift, lo=cfg.score_lo, hi=cfg.score_hi)
                for g in ctx["gens"]
            ]
        )
        return s.to(self.device), self._ends(ctx)

    # ----- the step -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_student, opt_critic = self.optimizers()
        sched_student, sched_critic = self.lr_schedulers()
        cfg = self.dmd_config
        ctx = self._context(batch)
        B = ctx["text"].shape[0]
        critic = self._velocity(self.critic, ctx)
        step = self.global_step
        measure = cfg.monitor_every > 0 and step % cfg.monitor_every == 0

        start = time.perf_counter()
        totals: dict[str, Tensor] = {}  # the critic's logs, summed over the ttur phases
        for phase in range(cfg.ttur):
            with torch.no_grad():
                x0 = self._simulate(ctx, phase)
            s, eps = self._score_draw(ctx)
            # TREAD: a route per critic phase; not with the GAN head (it reads whole-sequence features)
            route = self.token_route(batch, f"tread/critic{phase}") if self.gan is None else None
            critic_for_loss = self._critic_for_loss(ctx, route)
            if self.gan is None:
                loss, logs = core.critic_loss(critic_for_loss, x0, s=s, eps=eps, scored=ctx["scored"])
            else:
                loss, logs = self._critic_loss_with_gan(critic_for_loss, ctx, x0, s, eps)
            self.manual_backward(loss)
            # (not a Lightning step: global_step counts generator steps)
            last = phase == cfg.ttur - 1
            self._update(opt_critic.optimizer, self._critic_side, cfg.critic_clip, "critic", measure and last)
            self._critic_steps += 1
            totals = {k: totals.get(k, 0) + v.detach() for k, v in logs.items()}
        for k, v in totals.items():
            self.log(f"train/critic_{k}", v / cfg.ttur, sync_dist=True, batch_size=B)
        critic_time = time.perf_counter() - start

        start = time.perf_counter()
        x0 = self._simulate(ctx, cfg.ttur, self.token_route(batch, "tread/student"))
        s, eps = self._score_draw(ctx)
        weights = {"video": cfg.video_weight, "audio": cfg.audio_weight}
        teacher = self._guided_teacher(ctx)
        scored = ctx["scored"]
        loss, logs = core.generator_loss(x0, teacher, critic, s=s, eps=eps, weights=weights, scored=scored)
        if self.gan is not None:
            gan_loss, gan_logs = self.gan.generator_loss(critic, x0, s=s, eps=eps, heard=ctx["heard"])
            loss, logs = loss + gan_loss, logs | {f"gan_{k}": v for k, v in gan_logs.items()}
        self.manual_backward(loss)
        # (a Lightning step even when skipped: global_step, both schedules and signals advance alike)
        finite = self._update(opt_student, self.model, cfg.student_clip, "student", measure)
        self.skipped_optimizer_step = not finite
        if self.gan is not None:  # the generator's GAN term reached the critic and head: not theirs
            opt_critic.optimizer.zero_grad(set_to_none=True)
        sched_student.step()
        sched_critic.step()
        for k, v in logs.items():
            self.log(f"train/generator_{k}", v, sync_dist=True, batch_size=B)
        self.log("train/generator_loss", loss.detach(), prog_bar=True, sync_dist=True, batch_size=B)
        if ctx["a2v"] is not None:
            self.log("train/frac_a2v", ctx["a2v"].float().mean(), sync_dist=True, batch_size=B)
        if measure:
            self._log_update_norms(step)
        self.log("train/generator_step", float(self.global_step), on_step=True, on_epoch=False)
        self.log("train/critic_step", float(self._critic_steps), on_step=True, on_epoch=False)
        self.log("perf/critic_phase_s", critic_time, on_step=True, on_epoch=False)
        self.log("perf/generator_phase_s", time.perf_counter() - start, on_step=True, on_epoch=False)

    def _critic_loss_with_gan(self, critic, ctx: dict, x0: dict, s: Tensor, eps: dict) -> tuple[Tensor, dict]:
        """The critic's loss plus the head's: D(fake) from the critic loss's own forward, D(real)
        of the batch's latents noised to the same s with the same eps."""
        with self.gan.tap.capture() as features:
            loss, logs = core.critic_loss(critic, x0, s=s, eps=eps, scored=ctx["scored"])
        fake = self.gan.logits(features, x0, ctx["heard"])
        perturbation = self._draw(ctx) if self.gan.cfg.r1_weight > 0 else None
        real = {m: v.to(self.device) for m, v in ctx["real"].items()}
        d_loss, d_logs = self.gan.discriminator_loss(
            critic, fake, real, s=s, eps=eps, perturbation=perturbation, heard=ctx["heard"]
        )
        return loss + d_loss, logs | {f"gan_{k}": v for k, v in d_logs.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dmd_critic_steps"] = self._critic_steps
        checkpoint["dmd_nonfinite"] = dict(self._nonfinite)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._critic_steps = int(checkpoint.get("dmd_critic_steps", 0))
        self._nonfinite = {k: int(v) for k, v in checkpoint.get("dmd_nonfinite", self._nonfinite).items()}


def _check_lr_ratio(student_lr: float, critic_lr: float, expected: float) -> None:
    """One warning when the critic's rate is far from `expected` x the student's (e.g. an experiment
    that set `module.optim.lr` alone: the critic then barely moves and the student diverges)."""
    ratio = critic_lr / student_lr if student_lr > 0 else float("inf")
    if 1 / LR_RATIO_TOLERANCE <= ratio / expected <= LR_RATIO_TOLERANCE:
        return
    log.warning(
        "DMD-2: module.critic_optim.lr=%g is %.3g x module.optim.lr=%g, more than %gx off "
        "module.dmd.critic_lr_ratio=%g: set both rates (one alone leaves the other behind)",
        critic_lr,
        ratio,
        student_lr,
        LR_RATIO_TOLERANCE,
        expected,
    )


def _host_copy(params: list[Tensor]) -> list[Tensor]:
    """float32 host copies of the parameters' local shards (no device memory)."""
    return [_local(p).detach().to("cpu", torch.float32, copy=True) for p in params]


def _change_norm(params: list[Tensor], before: list[Tensor]) -> Tensor:
    """The global norm of `params - before` (sharded parameters: over all their shards)."""
    from torch.distributed.tensor import DTensor

    squares = []
    for p, old in zip(params, before, strict=True):
        change = _local(p).detach().float() - old.to(p.device)
        if isinstance(p, DTensor):
            change = DTensor.from_local(change, p.device_mesh, p.placements, run_check=False)
        norm = torch.linalg.vector_norm(change)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).square())
    return torch.stack(squares).sum().sqrt()


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (a view), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
