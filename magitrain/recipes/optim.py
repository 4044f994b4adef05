"""AdamW and learning-rate schedules (linear warmup, then cosine decay or constant)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn

log = logging.getLogger("magitrain")

OPTIMIZER_STATES = ("float32", "bfloat16", "8bit")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int | None = None  # linear warmup length; None: warmup_fraction of the total steps
    warmup_fraction: float = 0.0
    schedule: str = "constant"  # constant | cosine
    total_steps: int = 0  # cosine horizon; 0 = the trainer's max_steps
    min_lr_ratio: float = 0.0
    # dtype of AdamW's two moments: float32 (torch AdamW) | bfloat16 | 8bit (torchao AdamW8bit);
    # 8 | 4 | ~2 bytes per parameter (magitrain.recipes.low_precision_adamw, docs/training.md)
    states: str = "float32"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)  # plain values: checkpoints load weights-only
        if self.states not in OPTIMIZER_STATES:
            raise ValueError(f"optim.states must be one of {OPTIMIZER_STATES}, got {self.states!r}")


def build_adamw(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    hyper = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.states == "bfloat16":
        from .low_precision_adamw import AdamWBf16States

        return AdamWBf16States(params, **hyper)
    if cfg.states == "8bit":
        from .low_precision_adamw import TorchaoAdamW8bit

        return TorchaoAdamW8bit(params, **hyper)
    # fused AdamW needs CUDA tensors; DTensors (FSDP2) are supported by the fused kernel as well.
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def warmup_length(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup steps: `warmup_steps`, or `warmup_fraction` of the run; shorter than the run, whatever
    the schedule (a 10-step run warming up over 20 would never reach its learning rate)."""
    if cfg.warmup_steps is None:
        return round(cfg.warmup_fraction * total_steps)
    if 0 < total_steps <= cfg.warmup_steps:
        warn = log.warning if rank_zero_only.rank == 0 else log.debug  # once, not once per rank
        warn(
            "optim.warmup_steps=%d is not shorter than the %d training steps: warming up over %d",
            cfg.warmup_steps,
            total_steps,
            total_steps - 1,
        )
        return total_steps - 1
    return cfg.warmup_steps


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the base lr at a step: linear warmup, then constant or cosine down to min_lr_ratio."""
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    if cfg.schedule == "cosine" and total_steps <= 0:
        raise ValueError("a cosine schedule needs optim.total_steps or trainer.max_steps")
    warmup = warmup_length(cfg, total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_optimizer_and_schedule(module: nn.Module, params, cfg: OptimConfig, total_steps: int) -> dict:
    """The `configure_optimizers` answer for one optimiser stepped every optimisation step."""
    optimizer = build_adamw(params, cfg, module.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.total_steps or total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
