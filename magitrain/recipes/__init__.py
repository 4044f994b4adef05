"""Training methods as LightningModules: flow matching (base pretraining, SR fine-tuning), DMD-2 (of the base
and of the SR stage)."""

from .dmd2 import DMD2Module, DMDConfig
from .flow_matching import FlowMatchingConfig, FlowMatchingModule
from .module import MagiHumanModule
from .optim import OptimConfig
from .sr import RenoisedUpsample, SRConfig, SRFineTuneModule
from .sr_dmd2 import SRDistillConfig, SRDMD2Module

__all__ = [
    "DMD2Module",
    "DMDConfig",
    "FlowMatchingConfig",
    "FlowMatchingModule",
    "MagiHumanModule",
    "OptimConfig",
    "RenoisedUpsample",
    "SRConfig",
    "SRDMD2Module",
    "SRDistillConfig",
    "SRFineTuneModule",
]
