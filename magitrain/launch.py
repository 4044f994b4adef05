"""Build everything a Hydra config names and run `trainer.fit`: the body of `train.py`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as L
import torch
from omegaconf import DictConfig, OmegaConf

from magitrain.checkpoint.atomic_io import AtomicCheckpointIO

log = logging.getLogger("magitrain")

SINGLE_FILE_STRATEGIES = ("auto", "ddp")  # strategies that write one checkpoint file through CheckpointIO


def build_strategy(cfg: DictConfig):
    if cfg.name == "auto":
        return "auto"
    return hydra.utils.instantiate({k: v for k, v in cfg.items() if k != "name"})


def _instantiate_group(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping nulls."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last` -> this run's newest checkpoint (None, i.e. a fresh start, if there is none yet)."""
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return cfg.ckpt_path
    last = Path(cfg.callbacks.model_checkpoint.dirpath) / "last.ckpt"
    if last.exists():
        return str(last)
    log.warning("ckpt_path=last but %s does not exist yet: starting from scratch", last)
    return None


def _resume_wandb(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Continue the W&B run that the checkpoint was logged to."""
    if not ckpt_path or "wandb" not in (cfg.logger or {}) or cfg.logger.wandb.get("id"):
        return
    ckpt = Path(ckpt_path)
    meta = ckpt / "meta.pt" if ckpt.is_dir() else ckpt  # FSDP2 distributed checkpoints keep it there
    if meta.is_file():
        state = torch.load(meta, map_location="cpu", weights_only=False, mmap=True)
        if state.get("wandb_run_id"):
            cfg.logger.wandb.id = state["wandb_run_id"]


def train(cfg: DictConfig) -> L.Trainer:
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    ckpt_path = resolve_ckpt_path(cfg)
    _resume_wandb(cfg, ckpt_path)

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    plugins = [AtomicCheckpointIO()] if cfg.strategy.name in SINGLE_FILE_STRATEGIES else []
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        strategy=build_strategy(cfg.strategy),
        callbacks=_instantiate_group(cfg.callbacks),
        logger=_instantiate_group(cfg.logger) or False,
        plugins=plugins,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    for logger in trainer.loggers:  # flush W&B (its offline runs write their summary on finish)
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()
    return trainer
