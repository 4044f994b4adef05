"""Validation samples during training: every N steps, generate clips for a few fixed prompts with
the module's network (its EMA shadow when there is one) and log the mp4s, with sound, to W&B.

The sampler follows the recipe (the module's `validation_sampling`): a base model samples with
32-step UniPC and CFG, a distilled one with the 8-step sampler; `steps` / `sampler` override it.
The clips come from the same `MagiHumanPipeline` as `infer.py`, with its own seeded generator, so
they are comparable across steps and runs and leave the training RNG untouched. Networks sharded
over ranks (FSDP2, ZeRO-3) need every rank in each forward: then all ranks sample and rank zero
decodes and logs; otherwise rank zero alone does the work while the others wait for it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from lightning.pytorch import Callback


class Validation(Callback):
    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 1000,
        seconds: float = 2.0,
        resolution: str = "256p",
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        use_ema: bool = True,
        precision: str = "auto",
        dirpath: str | None = None,
        log_key: str = "val/samples",
        network: str | None = None,
        compare_with: str | None = None,
    ):
        """network: a module attribute to sample instead of the trained one (e.g. DMD-2's "teacher").
        compare_with: the log_key of a Validation callback before this one (same prompts and seeds):
        each validation step logs the RMS distance of this one's latents from its latents per
        modality, `{log_key}_rms_to_{its name}_{video,audio}` (DMD-2: the student's from the teacher's)."""
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.validation.every_n_steps must be positive, got {every_n_steps}")
        if not prompts:
            raise ValueError("callbacks.validation.prompts is empty")
        self.every_n_steps, self.prompts = every_n_steps, list(prompts)
        self.options = dict(seconds=seconds, resolution=resolution, seed=seed)
        self.sampling = {k: v for k, v in dict(steps=steps, sampler=sampler).items() if v is not None}
        self.use_ema, self.precision, self.log_key = use_ema, precision, log_key
        self.dirpath, self.network, self.compare_with = dirpath, network, compare_with
        self._last_step = -1
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] = []  # per prompt, of the last step
        self._partner: Validation | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "codecs", None) is None:
            raise ValueError(
                "the validation callback decodes with the module's codecs, and it has none: "
                "add codecs=tiny or codecs=magihuman to the training command"
            )
        self.dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "validation")
        self.options.update(self.sampling_for(pl_module))
        if self.compare_with:
            self._partner = self._find_partner(trainer.callbacks)

    def _find_partner(self, callbacks: list) -> Validation:
        earlier = callbacks[: callbacks.index(self)]
        for callback in earlier:
            if isinstance(callback, Validation) and callback.log_key == self.compare_with:
                return callback
        raise ValueError(
            f"callbacks: the validation with log_key {self.log_key} compares with {self.compare_with}, "
            "and no validation callback before it has that log_key"
        )

    def sampling_for(self, pl_module) -> dict:
        """{steps, sampler}: this callback's when set (the pipeline picks the sampler of `steps`),
        else the recipe's (`module.validation_sampling`)."""
        recipe = dict(getattr(pl_module, "validation_sampling", None) or {})
        sampling = dict(self.sampling or recipe)
        # the recipe's other stages stay (SR: the size its network refines to)
        sampling |= {k: v for k, v in recipe.items() if k not in ("steps", "sampler")}
        if "steps" not in sampling:
            raise ValueError(
                f"{type(pl_module).__name__} names no validation sampler (validation_sampling): "
                "set callbacks.validation.steps (8: distilled, 32: base with CFG)"
            )
        return sampling

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # counts the optimiser step just taken
        if step == self._last_step or step % self.every_n_steps:  # (accumulation micro-batches)
            return
        self._last_step = step
        if self.network:
            network = getattr(pl_module, self.network)
        else:
            network = pl_module.ema if self.use_ema and pl_module.ema is not None else pl_module.model
        if not (trainer.is_global_zero or _is_sharded(network)):
            return
        was_training = network.training
        network.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        # a network kept off the device between uses (DMD-2's offloaded teacher) visits it now
        resident = getattr(pl_module, "resident", lambda network: nullcontext())
        try:
            with torch.random.fork_rng(devices=devices), resident(network):  # (the pipeline has its own)
                paths = self._generate(trainer, network, pl_module, step)
        finally:
            network.train(was_training)
        if trainer.is_global_zero:
            self._log(trainer, paths, step)
            if self._partner is not None and self._partner._last_step == step:
                self._log_distances(trainer, step)

    def _log_distances(self, trainer, step: int) -> None:
        """RMS distance of this callback's latents from its partner's, per modality, over the prompts."""
        name = self._partner.log_key.rsplit("/", 1)[-1]
        metrics = {}
        for i, m in enumerate(("video", "audio")):
            squares = [(mine[i] - theirs[i]).float().pow(2).mean() for mine, theirs in zip(
                self.latents, self._partner.latents, strict=True)]  # fmt: skip
            metrics[f"{self.log_key}_rms_to_{name}_{m}"] = float(torch.stack(squares).mean().sqrt())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _generate(self, trainer, network, pl_module, step: int) -> list[Path]:
        from magitrain.inference import MagiHumanPipeline

        if hasattr(pl_module, "validation_pipeline"):  # a recipe with its own stages (SR: base + SR)
            pipe = pl_module.validation_pipeline(network, self.precision)
        else:
            offload = "codecs" if pl_module.codecs.offload else "none"  # codecs.offload: per stage
            pipe = MagiHumanPipeline(
                network, pl_module.codecs, device=pl_module.device, precision=self.precision, offload=offload
            )
        paths, self.latents = [], []
        for i, prompt in enumerate(self.prompts):
            if trainer.is_global_zero:
                path = self.dirpath / f"step{step:08d}" / f"sample{i}.mp4"
                clip = pipe.generate(prompt, **self.options)
                self.latents.append(tuple(x.cpu() for x in clip.latents))
                paths.append(clip.save(path))
                if self.options.get("sr"):  # beside it: the base stage upsampled to the SR size
                    paths.append(_upsampled_base(pipe, prompt, self.options, clip.video.shape[-2:], path))
            else:  # a sharded network: take part in its forwards, leave decoding to rank zero
                pipe.generate_latents(prompt, **self.options)
        return paths

    def _log(self, trainer, paths: list[Path], step: int) -> None:
        per_prompt = len(paths) // len(self.prompts)  # SR: the SR clip, then the upsampled base clip
        captions = [f"{self.prompts[k // per_prompt]} ({p.stem})" for k, p in enumerate(paths)]
        captions = captions if per_prompt > 1 else list(self.prompts)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                videos = [str(p) for p in paths]
                logger.log_video(
                    self.log_key, videos, step=step, caption=captions, format=["mp4"] * len(paths)
                )


def _upsampled_base(pipe, prompt: str, options: dict, size, sr_path: Path) -> Path:
    """The same seed's base-stage clip resized (bilinear) to the SR clip's `size`: `sampleI_lr_up.mp4`
    (at the base size the SR generation used: turned to the SR clip's orientation)."""
    from magitrain.inference import ClipShape

    clip, _ = ClipShape.stages(options["seconds"], options["resolution"], options["sr"])
    height, width = size
    base = pipe.generate(
        prompt, **{**options, "sr": None, "resolution": f"{clip.width}x{clip.height}"},
        output_size=f"{width}x{height}",
    )  # fmt: skip
    return base.save(sr_path.with_name(f"{sr_path.stem}_lr_up.mp4"))


def _is_sharded(network: torch.nn.Module) -> bool:
    """FSDP2 parameters are DTensors; DeepSpeed ZeRO-3 marks its partitioned parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in network.parameters())
