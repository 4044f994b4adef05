"""Training methods as LightningModules: flow matching (base pretraining, SR fine-tuning), DMD-2."""

from .flow_matching import FlowMatchingConfig, FlowMatchingModule
from .module import MagiHumanModule
from .optim import OptimConfig

__all__ = ["FlowMatchingConfig", "FlowMatchingModule", "MagiHumanModule", "OptimConfig"]
