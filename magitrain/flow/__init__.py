"""Flow matching for MagiHuman: inference grids, the distilled / base (UniPC + CFG) / SR samplers,
and the training-side interpolant, noise-level sampling and velocity loss."""

from .base import sample_base
from .conditioning import condition_on_image, hold_clean
from .distill import distill_step, sample_distilled
from .guidance import Guidance, cfg, sr_guidance_scales, voice_guided
from .noise import gaussian, initial_latents
from .schedules import (
    DEFAULT_SHIFT,
    SIGMA_MAX,
    flow_grid,
    shift_sigmas,
    sr_renoise_coefficient,
    unshifted_sigmas,
    zero_snr_alphas_sqrt,
)
from .sr import sample_super_resolution, upsample_latent, vp_renoise
from .training import (
    Conditioning,
    SigmaSampling,
    first_frame_mask,
    interpolate,
    sample_sigmas,
    sigma_bucket_stats,
    velocity_mse,
    velocity_target,
)
from .tread import TreadConfig
from .unipc import unipc_scheduler
from .velocity import VelocityFn

__all__ = [
    "DEFAULT_SHIFT",
    "SIGMA_MAX",
    "Conditioning",
    "Guidance",
    "SigmaSampling",
    "TreadConfig",
    "VelocityFn",
    "cfg",
    "condition_on_image",
    "distill_step",
    "first_frame_mask",
    "flow_grid",
    "gaussian",
    "hold_clean",
    "initial_latents",
    "interpolate",
    "sample_base",
    "sample_distilled",
    "sample_sigmas",
    "sample_super_resolution",
    "shift_sigmas",
    "sigma_bucket_stats",
    "sr_guidance_scales",
    "voice_guided",
    "sr_renoise_coefficient",
    "unipc_scheduler",
    "unshifted_sigmas",
    "upsample_latent",
    "velocity_mse",
    "velocity_target",
    "vp_renoise",
    "zero_snr_alphas_sqrt",
]
