"""The planner on DMD-2 and LoRA: its fake step against a real step measured by the same tracker,
its states against the real networks' tensors, and the layout arithmetic (FSDP2, CP, offload)."""

from __future__ import annotations

import hydra
import pytest

from magitrain.model.layers import ModalityLinear
from magitrain.plan import measure_step, plan
from magitrain.plan.planner import Layout, compose, per_gpu_rows

LATENT, BATCH, TEXT = (3, 4, 6), 2, 16


def _measure(overrides: list[str], fake: bool):
    cfg = compose(overrides)
    module = hydra.utils.instantiate(cfg.module)
    return measure_step(module, BATCH, LATENT, TEXT, str(cfg.trainer.precision), fake=fake), module


def _within(planned: int, real: int, share: float = 0.10) -> bool:
    return real > 0 and abs(planned - real) <= share * real


def _adam_bytes(params) -> int:
    """AdamW: two float32 moments per element and one float32 step counter per tensor."""
    params = list(params)
    return sum(8 * p.numel() + 4 for p in params)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("teacher_dtype", ["bfloat16", "float32"])
def test_dmd2_fake_phases_match_real_phases(teacher_dtype):
    overrides = ["recipe=dmd2_distill", "model=tiny", f"module.dmd.teacher_dtype={teacher_dtype}"]
    planned, _ = _measure(overrides, fake=True)
    real, module = _measure(overrides, fake=False)
    for role in ("params", "grads", "optimizer", "frozen", "ema", "buffers", "phase_grads"):
        assert getattr(planned, role) == getattr(real, role), role
    # the real networks' tensors: float32 student and critic, the teacher as stored
    student, critic = list(module.model.parameters()), list(module.critic.parameters())
    assert real.params == {"model": _bytes(student), "critic": _bytes(critic)}
    assert real.optimizer == {"model": _adam_bytes(student), "critic": _adam_bytes(critic)}
    assert real.frozen == {"teacher": _bytes(module.teacher.parameters())}
    assert real.ema == _bytes(module.ema.parameters()) == _bytes(student)
    # each phase holds its own network's gradients only
    assert real.phase_grads == {"critic": {"critic": _bytes(critic)}, "generator": {"model": _bytes(student)}}
    linears = sum(
        p.numel()
        for m in module.teacher.block.modules()
        if isinstance(m, ModalityLinear)
        for p in m.parameters()
    )
    # bfloat16: the block linears take 2 bytes an element instead of 4, the rest stays float32
    saved = 2 * linears if teacher_dtype == "bfloat16" else 0
    assert linears and real.frozen["teacher"] == _bytes(student) - saved
    assert set(real.activations) == {"critic", "generator"}
    for phase in real.activations:
        assert _within(planned.activations[phase], real.activations[phase]), phase
    assert _within(planned.peak, real.peak)


@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_lora_fake_step_matches_real_step(base_dtype):
    overrides = [
        "recipe=lora_base",
        "model=tiny",
        f"module.lora.base_dtype={base_dtype}",
        "module.lora.rank=4",
    ]
    planned, _ = _measure(overrides, fake=True)
    real, module = _measure(overrides, fake=False)
    for role in ("params", "grads", "optimizer", "frozen", "ema", "buffers"):
        assert getattr(planned, role) == getattr(real, role), role
    named = dict(module.model.named_parameters())
    adapters = [p for n, p in named.items() if ".default." in n]
    shadows = [p for n, p in named.items() if ".ema." in n]
    base = [p for n, p in named.items() if ".default." not in n and ".ema." not in n]
    assert adapters and all(p.requires_grad for p in adapters)
    assert real.params == real.grads == {"model": _bytes(adapters)}
    assert real.optimizer == {"model": _adam_bytes(adapters)}
    assert real.ema == _bytes(shadows) == _bytes(adapters)
    stored = _bytes(base)
    if base_dtype == "fp8":  # torchao float8 weights: one byte an element plus per-row scales
        from torch.distributed._tools.common_utils import get_untyped_storages

        stored = sum(st.nbytes() for p in base for st in get_untyped_storages(p))
        assert stored < _bytes(base)
    assert real.frozen == {"model": stored}
    assert _within(planned.activations["step"], real.activations["step"])
    assert _within(planned.peak, real.peak)


def test_dmd2_plan_layout():
    """FSDP2 shards every network (the frozen teacher too); teacher offload frees it outside the
    generator phase only; CP divides the activations; the numbers add up."""
    bucket = {"height": 64, "width": 96, "frames": 9, "batch_size": 1}
    base = ["recipe=dmd2_distill", "model=tiny", "strategy=fsdp2"]
    one = plan(base, 1, 2**30, bucket)
    four = plan(base, 4, 2**30, bucket)
    for row in ("student params", "critic params", "teacher (frozen)", "ema"):
        assert four.per_gpu[row] == one.per_gpu[row] // 4, row
    assert set(one.activations_by_phase) == {"critic", "generator"}
    assert one.total == sum(one.per_gpu.values())

    # measured through the Ulysses code on a fake 2 x 2 mesh: each rank holds half of the sequence
    cp = plan([*base, "strategy.context_parallel=2"], 4, 2**30, bucket)
    for phase, value in four.activations_by_phase.items():
        assert 0.4 * value < cp.activations_by_phase[phase] < 0.75 * value, phase
    assert cp.per_gpu["student params"] == four.per_gpu["student params"]  # sharded over dp x cp

    mem, _ = _measure(["recipe=dmd2_distill", "model=tiny"], fake=True)
    kept = Layout(strategy="ddp", world=1)
    off = Layout(strategy="ddp", world=1, teacher_offload=True)
    assert per_gpu_rows(mem, off, "critic")[1] == mem.frozen["teacher"]  # on the host
    assert per_gpu_rows(mem, off, "critic")[0]["teacher (frozen)"] == 0
    assert per_gpu_rows(mem, off, "generator")[0] == per_gpu_rows(mem, kept, "generator")[0]

    tight = plan(base, 1, one.total // 3, bucket)
    assert not tight.fits and tight.largest_batch == 0
    text = "\n".join(tight.suggestions)
    assert "module.parallel.cpu_offload=true" in text and "teacher_offload" in text


@pytest.mark.parametrize("states", ["bfloat16", "8bit"])
def test_low_precision_optimizer_states_match_real_step(states):
    """module.optim.states: bfloat16 runs its real optimiser on fakes; 8-bit (torchao cannot quantise
    fakes) is counted by its layout rule; both equal the real optimiser's state bytes."""
    overrides = ["model=tiny", f"module.optim.states={states}"]
    planned, _ = _measure(overrides, fake=True)
    real, module = _measure(overrides, fake=False)
    assert planned.optimizer == real.optimizer
    full = _adam_bytes(module.model.parameters())
    assert real.optimizer["model"] < 0.6 * full  # (float32 AdamW: 8 bytes an element)


def test_lora_dmd2_counts_its_one_frozen_base_once():
    """recipe=lora_dmd2 (student and critic adapters over one frozen base, the teacher is the base)
    is planned by the generic step: the shared base counted once, fake equal to real."""
    overrides = ["recipe=lora_dmd2", "model=tiny"]
    planned, _ = _measure(overrides, fake=True)
    real, module = _measure(overrides, fake=False)
    for role in ("params", "grads", "optimizer", "frozen", "ema", "phase_grads"):
        assert getattr(planned, role) == getattr(real, role), role
    base = [p for n, p in module.model.named_parameters() if ".lora_A." not in n and ".lora_B." not in n]
    assert real.frozen == {"model": _bytes(base)}  # (not once per role: student, critic, teacher)
    assert set(real.params) == {"model", "critic"}
    assert set(real.activations) == {"critic", "generator"}


def test_sr_fake_step_matches_real_step():
    """The SR recipe's own step (its LR latent at `flow.lr_size`, its source draws) on fakes."""
    overrides = ["recipe=sr_finetune_540p", "model=tiny"]
    planned, _ = _measure(overrides, fake=True)
    real, _ = _measure(overrides, fake=False)
    for role in ("params", "grads", "optimizer", "frozen", "ema", "buffers"):
        assert getattr(planned, role) == getattr(real, role), role
    assert _within(planned.activations["step"], real.activations["step"])
    assert _within(planned.peak, real.peak)


def test_sr_plans_a_portrait_clip_with_a_portrait_lr_latent():
    """The planned SR step's LR latent takes the clip's orientation, as the recipe's LR clip does:
    256p (448x256) is a 16x28 latent under a landscape clip and 28x16 under a portrait one. Catches
    the planner keeping the landscape LR (checked by planting it: this test then fails)."""
    from magitrain.plan.step import _lr_latent_hw

    module = hydra.utils.instantiate(compose(["recipe=sr_finetune_540p", "model=tiny"]).module)
    assert _lr_latent_hw(module, (3, 32, 56)) == (16, 28)
    assert _lr_latent_hw(module, (3, 56, 32)) == (28, 16)
