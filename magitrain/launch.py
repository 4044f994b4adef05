"""Build everything a Hydra config names and run `trainer.fit`: the body of `train.py`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as L
from lightning.pytorch.callbacks.progress import ProgressBar as ProgressBarBase
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from magitrain.callbacks.checkpoint import EXIT_CODE_SIGNALLED, RunCheckpoint
from magitrain.callbacks.console import ProgressBar
from magitrain.checkpoint.atomic_io import AtomicCheckpointIO
from magitrain.checkpoint.resume import checkpoint_meta, newest_checkpoint, run_checkpoints
from magitrain.errors import UserError

log = logging.getLogger("magitrain")

SINGLE_FILE_STRATEGIES = ("auto", "ddp")  # strategies that write one checkpoint file through CheckpointIO
# top-level keys naming checkpoints a recipe reads when it builds its networks (after Lightning's
# start-up lines): checked first, by the key the user typed
CHECKPOINT_KEYS = ("init", "teacher", "student_init", "critic_init")


def build_strategy(cfg: DictConfig):
    if cfg.name == "auto":
        return "auto"
    return hydra.utils.instantiate({k: v for k, v in cfg.items() if k != "name"})


def build_callbacks(cfg: DictConfig) -> list:
    """The config's callbacks; where it names no progress bar, ours in place of Lightning's default
    rich bar, which titled a run bounded by max_steps `Epoch 37/-2` (magitrain/callbacks/console.py)."""
    callbacks = _instantiate_group(cfg.callbacks)
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, ProgressBarBase) for c in callbacks
    ):
        callbacks.append(ProgressBar())
    return callbacks


def _instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping nulls."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def check_checkpoint_paths(cfg: DictConfig) -> None:
    """A checkpoint path that does not exist is reported now, naming its key, not at step 0."""
    for key in CHECKPOINT_KEYS:
        value = cfg.get(key)
        if value and not Path(value).expanduser().exists():
            raise UserError(f"{key}={value}: no such file or directory")


def refuse_stale_checkpoints(cfg: DictConfig) -> None:
    """A fresh start into a run directory whose checkpoint folder holds an earlier run's files would
    overwrite some and keep others, and a later `ckpt_path=last` could resume the earlier run.
    A run without the checkpoint callback writes none: nothing to mix with."""
    checkpoint = cfg.callbacks.get("model_checkpoint")
    if checkpoint is None:
        return
    ckpt_dir = Path(checkpoint.dirpath)
    found = sorted(p.name for p in run_checkpoints(ckpt_dir, cfg.paths.output_dir))
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(
            f"{ckpt_dir} holds checkpoints of an earlier run ({shown}): resume it with ckpt_path=last, "
            f"or start a new run in another directory (hydra.run.dir=...)"
        )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last` -> this run's newest checkpoint (None, i.e. a fresh start, if there is none yet)."""
    if not cfg.ckpt_path:
        refuse_stale_checkpoints(cfg)
        return None
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
            raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return cfg.ckpt_path
    ckpt_dir = Path(cfg.callbacks.model_checkpoint.dirpath)
    newest = newest_checkpoint(ckpt_dir, cfg.paths.output_dir)
    if newest is None:
        log.warning("ckpt_path=last but %s holds no checkpoint yet: starting from scratch", ckpt_dir)
        return None
    log.info("ckpt_path=last: resuming from %s", newest)
    return str(newest)


def _resume_wandb(cfg: DictConfig, meta: dict) -> None:
    """Continue the W&B run that the checkpoint was logged to."""
    if "wandb" not in (cfg.logger or {}) or cfg.logger.wandb.get("id"):
        return
    if meta.get("wandb_run_id"):
        cfg.logger.wandb.id = meta["wandb_run_id"]


def train(cfg: DictConfig) -> L.Trainer:
    # a config with a missing value fails here, before it replaces the run's config.yaml
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_checkpoint_paths(cfg)
    ckpt_path = resolve_ckpt_path(cfg)  # (a refused start leaves the earlier run's config.yaml)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))  # this start's (records: starts/)

    if ckpt_path:  # read weights-only before Lightning does: a file holding objects is refused by name
        _resume_wandb(cfg, checkpoint_meta(ckpt_path))

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    plugins = [AtomicCheckpointIO()] if cfg.strategy.name in SINGLE_FILE_STRATEGIES else []
    plugins += _instantiate_group(cfg.get("plugins"))  # e.g. cluster=slurm's SLURMEnvironment
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        strategy=build_strategy(cfg.strategy),
        callbacks=build_callbacks(cfg),
        logger=_instantiate_group(cfg.logger) or False,
        plugins=plugins,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as stop:  # Lightning's own stop, for a SIGTERM before training started
        raise SystemExit(EXIT_CODE_SIGNALLED) from stop
    for logger in trainer.loggers:  # flush W&B (its offline runs write their summary on finish)
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()
    if any(isinstance(cb, RunCheckpoint) and cb.stopped_by for cb in trainer.callbacks):
        raise SystemExit(EXIT_CODE_SIGNALLED)  # stopped by a signal after saving the step reached
    return trainer
