"""The denoising step of each sampler, eager or torch.compile'd whole (`compile=step`).

One compiled function per (network, sampler): image conditioning, the DiT forward(s) (prompt and
negative prompt for CFG), the CFG combination and, for the distilled sampler, the update itself
(its noise is drawn outside and passed in, so the graph holds no generator). UniPC's update stays
eager: diffusers' solver keeps its history and step index in Python state, which would
specialise a graph per step for a few elementwise ops on the latent.

The first call with a new input signature (shapes, dtypes, devices) compiles: `WarmedStep`
makes that call once more than needed, inside `StageTimer.warmup`, so compilation is timed as
warm-up and left out of the stage's seconds; the step is a pure function of its inputs, so the
extra call changes nothing. `compile=blocks` (each transformer layer compiled, as the release
does) warms its eager steps up the same way.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

from torch import Tensor

from magitrain.flow.base import guided_velocity
from magitrain.flow.distill import distilled_step
from magitrain.flow.sr import conditioned_velocity
from magitrain.model.compile import compile_fn, compile_layers

from .timing import StageTimer

COMPILE_MODES = ("none", "blocks", "step")
STEP_FUNCTIONS = {"distilled": distilled_step, "base": guided_velocity, "sr": conditioned_velocity}


def signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)


class WarmedStep:
    """A sampler step whose first call per input signature is made twice, the first time inside
    `timer.warmup(stage)` (`timer` is set per generation): compilation is timed apart."""

    def __init__(self, fn, stage: str):
        self.fn, self.stage = fn, stage
        self.timer: StageTimer | None = None
        self.seen: set[tuple] = set()

    def __call__(self, *args):
        key = signature(args)
        if key not in self.seen:
            with self.timer.warmup(self.stage) if self.timer is not None else nullcontext():
                self.fn(*args)
            self.seen.add(key)
        return self.fn(*args)


def build_steps(model, sr_model, mode: str, backend: str = "inductor") -> dict:
    """{sampler: step function} for `compile=mode`: {} for none (the samplers' own eager steps);
    blocks compiles each network's transformer layers in place and warms the eager steps up."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return {}
    if mode == "blocks":
        for network in filter(None, (model, sr_model)):
            if network.block.layers[0]._compiled_call_impl is None:  # not yet (benchmark rows share one)
                compile_layers(network, backend)

    def step(kind: str, velocity_fn, stage: str) -> WarmedStep:
        fn = functools.partial(STEP_FUNCTIONS[kind], velocity_fn)
        return WarmedStep(compile_fn(fn, backend=backend) if mode == "step" else fn, stage)

    steps = {"distilled": step("distilled", model, "base"), "base": step("base", model, "base")}
    if sr_model is not None:
        sr_velocity = functools.partial(sr_model, coords_style="v1")
        steps["sr"], steps["sr_cfg"] = step("sr", sr_velocity, "sr"), step("base", sr_velocity, "sr")
    return steps
