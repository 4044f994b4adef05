"""Validation samples during training: every N steps, generate clips for a few fixed prompts with
the module's network (its EMA shadow when there is one), score them with `magitrain.eval` (the
weight-free metrics, and the model-based ones whose weights `metrics` names) and log the mp4s, with
sound, and the scores: means over the prompts to every logger (`{log_key}/{metric}`: CSV, W&B),
and a W&B table (video, prompt, metrics).

The sampler follows the recipe (the module's `validation_sampling`): a base model samples with
32-step UniPC and CFG, a distilled one with the 8-step sampler; `steps` / `sampler` override it.
The clips come from the same `MagiHumanPipeline` as `infer.py`, with its own seeded generator, so
they are comparable across steps and runs and leave the training RNG untouched. Networks sharded
over ranks (FSDP2, ZeRO-3) need every rank in each forward: then all ranks sample and rank zero
decodes and logs; otherwise rank zero alone does the work while the others wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from lightning.pytorch import Callback

from magitrain.eval.clip import Reference
from magitrain.eval.stats import is_number

log = logging.getLogger(__name__)


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
        metrics: dict | bool = True,
        cache: bool = False,
        audio: list[str | None] | None = None,
    ):
        """network: a module attribute to sample instead of the trained one (e.g. DMD-2's "teacher").
        compare_with: the log_key of a Validation callback before this one (same prompts and seeds):
        each validation step logs the RMS distance of this one's latents from its latents per
        modality, `{log_key}_rms_to_{its name}_{video,audio}` (DMD-2: the student's from the
        teacher's), and its metrics minus this one's, `{its log_key}_minus_{name}/{metric}`.
        metrics: the `eval.*` options of `python -m magitrain.eval` (asr_path, clip_path,
        syncnet_path, max_lag, device); true: the weight-free metrics only; false: no scores.
        cache: the network never changes (DMD-2's frozen teacher): sample each prompt and seed once,
        then reuse its clip, latents and scores at every validation step.
        audio: per prompt, a file whose sound drives that prompt's clip (audio-driven video, as
        `infer.py audio=`: e.g. a held-out clip's mp4 or wav; the clip is `seconds` long or the
        sound's length if shorter, and its mp4 carries that sound), or null: text to video."""
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.validation.every_n_steps must be positive, got {every_n_steps}")
        if not prompts:
            raise ValueError("callbacks.validation.prompts is empty")
        self.every_n_steps, self.prompts = every_n_steps, list(prompts)
        self.audio = list(audio) if audio else [None] * len(self.prompts)
        if len(self.audio) != len(self.prompts):
            raise ValueError(
                f"callbacks.validation.audio has {len(self.audio)} entries for {len(self.prompts)} prompts: "
                "give one per prompt (null: text to video)"
            )
        self.options = dict(seconds=seconds, resolution=resolution, seed=seed)
        self.sampling = {k: v for k, v in dict(steps=steps, sampler=sampler).items() if v is not None}
        self.use_ema, self.precision, self.log_key = use_ema, precision, log_key
        self.dirpath, self.network, self.compare_with = dirpath, network, compare_with
        self.evaluator = _evaluator(metrics)
        self.cache = cache
        self._last_step = -1
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] = []  # per prompt, of the last step
        self.scores: list[dict] = []  # per prompt, of the last step
        self._cached: dict[tuple[str, int], tuple] = {}  # (prompt, seed) -> (paths, latents, scores)
        self._partner: Validation | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "codecs", None) is None:
            raise ValueError(
                "the validation callback decodes with the module's codecs, and it has none: "
                "add codecs=tiny or codecs=magihuman to the training command"
            )
        self.dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "validation")
        for i, path in enumerate(self.audio):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"callbacks.validation.audio[{i}]={path}: no such file")
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
        if self.cache and all(self._key(i) in self._cached for i in range(len(self.prompts))):
            self._reuse(trainer, step)
            return
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
            self.scores = self._score(paths)
            self._log(trainer, paths, step)
            self._log_scores(trainer, paths, step, table=True)
        if self.cache:  # on every rank: the ranks of a sharded network skip its forwards together
            self._remember(paths)

    def _key(self, i: int) -> tuple[str, str | None, int]:
        return self.prompts[i], self.audio[i], self.options["seed"]

    def _options(self, i: int) -> dict:
        """The pipeline's options for prompt i: with its given audio, if any."""
        return self.options | ({"audio": self.audio[i]} if self.audio[i] is not None else {})

    def _remember(self, paths: list[Path]) -> None:
        """Cache each prompt's clips, latents and scores (on ranks other than zero: that it ran)."""
        per_prompt = len(paths) // len(self.prompts)
        for i in range(len(self.prompts)):
            clips = paths[i * per_prompt : (i + 1) * per_prompt]
            latents = self.latents[i] if self.latents else None
            self._cached[self._key(i)] = (clips, latents, self.scores[i] if self.scores else {})

    def _reuse(self, trainer, step: int) -> None:
        """A cached network's validation step: its clips, latents and scores as first sampled; the
        scores and the comparison are logged again (to sit beside its partner's), the videos not."""
        cached = [self._cached[self._key(i)] for i in range(len(self.prompts))]
        self.latents = [latents for _, latents, _ in cached]
        self.scores = [scores for _, _, scores in cached] if self.evaluator else []
        if trainer.is_global_zero:
            self._log_scores(trainer, [path for paths, _, _ in cached for path in paths], step, table=False)

    def _score(self, paths: list[Path]) -> list[dict]:
        """Each prompt's clip scored by `magitrain.eval` (SR: the SR clip, not its upsampled base)."""
        if self.evaluator is None:
            return []
        per_prompt = len(paths) // len(self.prompts)
        scores = []
        for i, prompt in enumerate(self.prompts):
            row = self.evaluator.score(paths[i * per_prompt], Reference(prompt))
            if "error" in row:
                log.warning("validation %s, prompt %d: %s", self.log_key, i, row["error"])
            scores.append(row)
        return scores

    def _log_scores(self, trainer, paths: list[Path], step: int, table: bool) -> None:
        """The scores' means over the prompts, the comparison with the partner, and (`table`) a W&B
        table of the clips with their prompts and scores."""
        metrics = {f"{self.log_key}/{name}": value for name, value in _means(self.scores).items()}
        if self._partner is not None and self._partner._last_step == step:
            metrics |= self._comparison()
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if table and self.scores and type(logger).__name__ == "WandbLogger":
                _log_table(logger, f"{self.log_key}_table", paths, self.prompts, self.scores, step)

    def _comparison(self) -> dict[str, float]:
        """RMS distance of this callback's latents from its partner's, per modality, over the prompts;
        and the partner's metrics minus this one's, averaged over the prompts."""
        name = self._partner.log_key.rsplit("/", 1)[-1]
        mine = self.log_key.rsplit("/", 1)[-1]
        metrics = {}
        for i, m in enumerate(("video", "audio")):
            squares = [(ours[i] - theirs[i]).float().pow(2).mean() for ours, theirs in zip(
                self.latents, self._partner.latents, strict=True)]  # fmt: skip
            metrics[f"{self.log_key}_rms_to_{name}_{m}"] = float(torch.stack(squares).mean().sqrt())
        deltas = [
            _differences(ours, theirs)
            for ours, theirs in zip(self.scores, self._partner.scores, strict=False)
        ]
        for metric, value in _means(deltas).items():
            metrics[f"{self._partner.log_key}_minus_{mine}/{metric}"] = value
        return metrics

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
                clip = pipe.generate(prompt, **self._options(i))
                self.latents.append(tuple(x.cpu() for x in clip.latents))
                paths.append(clip.save(path))
                if self.options.get("sr"):  # beside it: the base stage upsampled to the SR size
                    paths.append(_upsampled_base(pipe, prompt, self._options(i), clip.video.shape[-2:], path))
            else:  # a sharded network: take part in its forwards, leave decoding to rank zero
                pipe.generate_latents(prompt, **self._options(i))
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


def _evaluator(metrics: dict | bool):
    """The `Evaluator` of the `metrics` option (see `Validation`), or None for no scores."""
    from magitrain.eval.evaluate import EvalOptions, Evaluator

    if metrics is False or metrics is None:
        return None
    options = {} if metrics is True else dict(metrics)
    known = [f.name for f in dataclasses.fields(EvalOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"callbacks.validation.metrics has no key {unknown[0]!r}; its keys: {', '.join(known)}"
        )
    return Evaluator(EvalOptions(**options))


def _means(rows: list[dict]) -> dict[str, float]:
    """{metric: mean over the rows where it is a number}."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, value in row.items():
            if is_number(value):
                values.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sorted(values.items())}


def _differences(ours: dict, theirs: dict) -> dict[str, float]:
    """theirs - ours, per metric that is a number in both."""
    return {k: theirs[k] - v for k, v in ours.items() if is_number(v) and is_number(theirs.get(k))}


def _log_table(
    logger, key: str, paths: list[Path], prompts: list[str], scores: list[dict], step: int
) -> None:
    """A W&B table: one row per prompt, its clip (playable, with sound), the prompt and its scores."""
    import wandb

    per_prompt = len(paths) // len(prompts)
    names = sorted({k for row in scores for k, v in row.items() if is_number(v)})
    data = [
        [wandb.Video(str(paths[i * per_prompt]), format="mp4"), prompt, *[row.get(n) for n in names]]
        for i, (prompt, row) in enumerate(zip(prompts, scores, strict=True))
    ]
    logger.log_table(key, columns=["video", "prompt", *names], data=data, step=step)
