"""The UniPC multistep solver of the base and SR stages: diffusers' scheduler, configured as released."""

from __future__ import annotations

from diffusers import UniPCMultistepScheduler

from .schedules import DEFAULT_SHIFT, unshifted_sigmas


def unipc_scheduler(steps: int, shift: float = DEFAULT_SHIFT) -> UniPCMultistepScheduler:
    """A ready-to-step flow-matching UniPC (order 2, bh2, x0 prediction, first order at the end).

    The grid equals `flow_grid(steps, shift)` exactly. The scheduler keeps the solver history, so
    every modality needs its own instance, and a fresh one per sampling run.
    `step(v, t, x).prev_sample` takes the velocity `v = eps - x0` (x0 = x - s v).
    """
    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=shift,
        prediction_type="flow_prediction",
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        predict_x0=True,
    )
    scheduler.set_timesteps(sigmas=unshifted_sigmas(steps))  # a NumPy array: lists are rejected
    return scheduler
