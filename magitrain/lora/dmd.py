"""LoRA-DMD (recipe=lora_dmd2): DMD-2 with adapters on the student and the critic over ONE frozen base.

The frozen base (from `teacher=`, bf16 / fp8 / fp32 per `lora.base_dtype`) is loaded once. Three
module trees share its tensors (`share_frozen`: the same Parameter objects, no second copy):

- the student (`self.model`): the base + the trained adapter "default" and its EMA shadow "ema";
- the critic (`self.critic`): the base + its own adapter "default";
- the teacher (`self.teacher`): the base itself, with no adapters at all.

With B initialised to zero, the student and the critic start as the teacher, as in DMD-2.

Why role trees rather than one tree whose PEFT adapters are switched per phase: the switch would
be global state that every consumer must get right. Activation checkpointing recomputes a block
in the backward with whatever adapter is active *then* (the generator loss runs the critic and
the teacher between the student's forward and its backward, so the student's gradients would be
computed through the critic's adapter); the student's optimiser, the EMA, validation and export
would each have to pick their adapter out of one module. Shared trees cost the same memory (a few
module objects) and leave every role a plain MagiHumanDiT, so DMD2Module runs unchanged.
"""

from __future__ import annotations

import torch

from magitrain.errors import UserError
from magitrain.parallel import parallelize
from magitrain.recipes.dmd2 import DMD2Module
from magitrain.recipes.sr_dmd2 import SRDMD2Module

from .adapters import share_frozen
from .recipe import LoraMixin


class LoraDMD2Module(LoraMixin, DMD2Module):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.student_init or self.critic_init:
            raise UserError(
                "recipe=lora_dmd2: the student and the critic are the teacher's base plus adapters; "
                "student_init / critic_init are full networks (recipe=dmd2_distill). Start the "
                "student's adapter from a file with module.lora.init=ADAPTER.safetensors"
            )
        if self.dmd_config.teacher_offload:
            raise UserError(
                "recipe=lora_dmd2: the teacher is the student's and critic's own frozen base, so "
                "module.dmd.teacher_offload cannot move it off the device; use module.lora.base_dtype=fp8"
            )
        if self.dmd_config.gan.enabled:  # its head would need a place in the adapter-only checkpoint
            raise UserError("recipe=lora_dmd2 does not support module.dmd.gan.enabled=true yet")
        # the teacher IS the frozen base: its storage is lora.base_dtype, not dmd.teacher_dtype
        self.dmd_config.teacher_dtype = "float32" if self.lora_config.base_dtype == "fp32" else "bfloat16"
        self.hparams["dmd"]["teacher_dtype"] = self.dmd_config.teacher_dtype
        self.init_path = self.teacher_path  # the base: resume checks it, export --merge uses it
        self.hparams["init"] = self.teacher_path

    def build_lora_networks(self) -> None:
        """`model`, `critic` and `teacher`: three module trees over one frozen base."""
        if not self.teacher_path:
            raise UserError("recipe=lora_dmd2 needs teacher=PATH (the frozen base, e.g. /ckpt/base)")
        self.check_lora_strategy()
        base = self.frozen_base()
        student, critic = share_frozen(base), share_frozen(base)
        self.lora_targets = self.adapt(student, self.lora_config.init, ema=self._ema_requested)
        self.adapt(critic)
        self.model = parallelize(student, self.parallel_config, None, trainable=True)
        self.critic = parallelize(critic, self.parallel_config, None, trainable=True)
        teacher = parallelize(base, self.parallel_config, None, trainable=False)
        object.__setattr__(self, "teacher", teacher.eval())

    def adapter_networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "critic": self.critic}

    def _velocity(self, *args, **kwargs):
        # a bf16 / fp8 base computes its block matmuls in bf16 in every role, not only the teacher's;
        # an fp32 base in the step's precision in every role, as recipe=lora_base's does
        return super()._velocity(*args, **{**kwargs, "bf16": True if self._teacher_bf16 else None})


class LoraSRDMD2Module(LoraDMD2Module, SRDMD2Module):
    """SR distillation (recipe=lora_sr_dmd2_1080p): `SRDMD2Module`'s source, fixed audio and
    unguided teacher, with LoRA-DMD's adapters on the student and the critic over one frozen SR
    base (from `teacher=`)."""
