"""Per-GPU memory plan of a training config: a measured fake step, then offload and fit arithmetic.

Measured (MemTracker on a real step of fake tensors, `step.py`): parameters, gradients, optimiser
states, EMA and frozen networks of every network (exact), and the peak activations of each phase.
FSDP2 plans are measured on rank 0 of a fake process group of the asked world size, through the
recipe's own FSDP2 and context-parallel code: local shards, gathered blocks and the rank's
sequence share are measured too. Computed: the DeepSpeed shares (DeepSpeed does not run on a
CPU), what offloading moves to the host, and a fragmentation margin.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig

from magitrain.data.buckets import parse_buckets
from magitrain.errors import UserError

from .step import StepMemory, fake_process_group, measure_step

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
FRAGMENTATION = 0.10  # caching-allocator slack on top of the tracked peak (rough, as torchtitan's 10%)
# which per-process states a strategy divides over the ranks
SHARDED = {
    "deepspeed_zero3": {"params", "grads", "optimizer", "ema"},
    "deepspeed_zero2": {"grads", "optimizer"},
}
# AdamW state bytes per trained parameter by `module.optim.states` (two moments; 8-bit: bitsandbytes'
# blockwise-quantised moments, ~2 bytes with their scales)
OPTIM_STATE_BYTES = {"float32": 8, "bfloat16": 4, "8bit": 2}
# the phases of a step that run a frozen network (the others may keep it on the host between uses)
TEACHER_PHASES = {"generator"}
GIB = 1024**3


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", str(text))
    if not m:
        raise UserError(f"gpu_memory={text!r}: expected a size like 80GB")
    return int(float(m.group(1)) * GIB)  # GB as cards are sold: 2**30 bytes (an 80 GB H100: 79.6 GiB)


def compose(overrides: list[str]) -> DictConfig:
    """The config `python train.py OVERRIDES` composes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


@dataclass
class Plan:
    recipe: str
    model: str
    strategy: str
    gpus: int
    gpu_memory: int
    bucket: dict
    context_parallel: int = 1
    peak_phase: str = "step"  # the phase whose total is the largest (per_gpu is that phase's)
    per_gpu: dict = field(default_factory=dict)  # bytes by role on one GPU at the peak phase
    activations_by_phase: dict = field(default_factory=dict)  # per GPU
    host: int = 0  # bytes per GPU held in host memory instead (offloading)
    total: int = 0
    fits: bool = False
    largest_batch: int = 0
    suggestions: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def largest_bucket(cfg: DictConfig) -> dict:
    buckets = parse_buckets(cfg.data.buckets)
    b = max(buckets, key=lambda b: b.batch_size * b.frames * b.height * b.width)
    return {"height": b.height, "width": b.width, "frames": b.frames, "batch_size": b.batch_size}


@dataclass
class Layout:
    """How the config places the measured states: sharding, context parallelism, offloading."""

    strategy: str
    world: int
    cp: int = 1
    measured_cp: int = 1  # the CP degree the activations were measured at (FSDP2: the config's)
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: every network FSDP2 shards lives on the host
    teacher_offload: bool = False  # the frozen teacher on the host between its uses
    labels: dict = field(default_factory=dict)  # network attribute -> row label

    @property
    def sharded(self) -> set:
        """The states computed as divided over the ranks (FSDP2's are measured per rank)."""
        return SHARDED.get(self.strategy, set())


def layout_of(cfg: DictConfig, module, gpus: int) -> Layout:
    strategy = cfg.strategy.name
    cp = int(cfg.strategy.get("context_parallel", 1) or 1)
    if gpus % cp:
        raise UserError(f"strategy.context_parallel={cp} must divide gpus={gpus}")
    dmd = getattr(module, "dmd_config", None)
    labels = {"model": "student"} if dmd is not None else {}
    return Layout(
        strategy=strategy,
        world=max(1, gpus),
        cp=cp,
        measured_cp=cp,
        cpu_offload=strategy == "fsdp2" and module.parallel_config.cpu_offload,
        # (module.dmd.teacher_offload: read with a default, older configs lack it)
        teacher_offload=bool(getattr(dmd, "teacher_offload", False)),
        labels=labels,
    )


def per_gpu_rows(mem: StepMemory, lay: Layout, phase: str) -> tuple[dict, int]:
    """(bytes per GPU by row, bytes per GPU moved to the host) at one phase."""
    rows, host = {}, 0

    def place(row: str, role: str, value: int, offloadable: bool) -> None:
        nonlocal host
        share = value // lay.world if role in lay.sharded else value
        if offloadable:
            host += share
            share = 0
        rows[row] = share

    fsdp_off = lay.cpu_offload
    for name in mem.params:
        label = lay.labels.get(name, name)
        place(f"{label} params", "params", mem.params[name], fsdp_off)
        place(f"{label} grads", "grads", mem.phase_grads.get(phase, mem.grads).get(name, 0), fsdp_off)
        place(f"{label} optimizer", "optimizer", mem.optimizer.get(name, 0), fsdp_off)
    place("ema", "ema", mem.ema, fsdp_off)
    for name, value in mem.frozen.items():
        label = lay.labels.get(name, name)
        # module.dmd.teacher_offload: under FSDP2 the teacher's shards stay on the host (its blocks
        # visit the device one by one, in the measured activations); elsewhere the whole teacher
        # visits the device for the phase that runs it
        offloaded = name == "teacher" and lay.teacher_offload
        offloaded = offloaded and (lay.strategy == "fsdp2" or phase not in TEACHER_PHASES)
        place(f"{label} (frozen)", "frozen", value, fsdp_off or offloaded)
    # each CP rank holds 1/cp of the sequence (measured at measured_cp; another degree is scaled)
    label = "activations (with FSDP2's gathered blocks)" if lay.strategy == "fsdp2" else "activations"
    rows[label] = mem.activations[phase] * lay.measured_cp // lay.cp
    return rows, host


def voice_tokens(cfg: DictConfig) -> int:
    """The longest voice reference a sample may carry (data.voice_reference on), what the step is
    planned with; 0 when references are off."""
    from magitrain.data.voice import VoiceReference

    voice = VoiceReference(**cfg.data.get("voice_reference", {}))
    return voice.token_range[1] if voice.enabled else 0


def plan(
    overrides: list[str], gpus: int, gpu_memory: int, bucket: dict | None = None, fake: bool = True
) -> Plan:
    cfg = compose(overrides)
    bucket = bucket or largest_bucket(cfg)
    from magitrain.data.buckets import Bucket

    latent = Bucket(bucket["height"], bucket["width"], bucket["frames"], bucket["batch_size"]).latent_shape
    module = hydra.utils.instantiate(cfg.module)
    lay = layout_of(cfg, module, gpus)
    fsdp2 = lay.strategy == "fsdp2"
    with fake_process_group(lay.world, lay.cp) if fsdp2 else nullcontext() as mesh:
        mem = measure_step(
            module,
            bucket["batch_size"],
            latent,
            int(cfg.data.get("text_max_len", 640)),
            str(cfg.trainer.precision),
            fake=fake,
            autocast_cache=not (lay.sharded or fsdp2),
            mesh=mesh,
            ref_len=voice_tokens(cfg),
        )
    p = Plan(
        recipe=str(cfg.recipe_name),
        model=str(cfg.model.name),
        strategy=lay.strategy,
        gpus=gpus,
        gpu_memory=gpu_memory,
        bucket=bucket,
        context_parallel=lay.cp,
        activations_by_phase=dict(mem.activations),
    )
    fill(p, mem, lay)
    p.suggestions = suggest(p, mem, module, lay, cfg)
    return p


def fill(p: Plan, mem: StepMemory, lay: Layout) -> None:
    """Totals, fit and largest batch of a plan from the measured memory and a layout."""
    totals = {}
    for phase in mem.activations:
        rows, host = per_gpu_rows(mem, lay, phase)
        subtotal = sum(rows.values())
        rows["fragmentation"] = int(subtotal * FRAGMENTATION)
        totals[phase] = (subtotal + rows["fragmentation"], rows, host)
    p.peak_phase = max(totals, key=lambda k: totals[k][0])
    p.total, p.per_gpu, p.host = totals[p.peak_phase]
    p.fits = p.total <= p.gpu_memory
    # activations grow with the batch (measured at the bucket's batch size, scaled linearly)
    room = []
    for total, rows, _ in totals.values():
        acts = next(v for k, v in rows.items() if k.startswith("activations"))
        per_sample = acts / p.bucket["batch_size"]
        fixed = total / (1 + FRAGMENTATION) - acts
        if per_sample:
            room.append(int((p.gpu_memory / (1 + FRAGMENTATION) - fixed) // per_sample))
    p.largest_batch = max(0, min(room)) if room else 0


def _with(p: Plan, mem: StepMemory, lay: Layout, **changes) -> Plan:
    """The same plan under a changed layout (arithmetic only, nothing re-measured)."""
    from dataclasses import replace

    q = replace(p, suggestions=[])
    fill(q, mem, replace(lay, **changes))
    return q


def _scaled_optimizer(mem: StepMemory, bytes_per_param: int) -> StepMemory:
    from dataclasses import replace

    # float32 AdamW keeps 8 bytes per trained float32 parameter (4 bytes): scale by the parameters
    return replace(mem, optimizer={k: mem.params[k] // 4 * bytes_per_param for k in mem.optimizer})


def suggest(p: Plan, mem: StepMemory, module, lay: Layout, cfg: DictConfig) -> list[str]:
    """Settings that bring the total under the card, each with the total it gives (same arithmetic)."""
    if p.fits:
        return []
    out = []
    lora = getattr(module, "lora_config", None)
    gib = lambda q: f"~{q.total / GIB:.1f} GiB per GPU ({'fits' if q.fits else 'does not fit'})"  # noqa: E731
    if not module.model.activation_checkpointing or module.model.checkpoint_every > 1:
        out.append(
            "activation checkpointing of every block: module.parallel.activation_checkpointing=true "
            "module.parallel.checkpoint_every=1 (re-plan with it to size it)"
        )
    if lay.strategy not in SHARDED and lay.strategy != "fsdp2" and lora is None:
        out.append("shard the states over the GPUs: strategy=fsdp2 (re-plan with it)")
    if lora is not None and lora.base_dtype != "fp8":
        out.append("the frozen base in float8: module.lora.base_dtype=fp8 (torchao; re-plan with it)")
    if lay.strategy == "fsdp2" and not lay.cpu_offload:
        q = _with(p, mem, lay, cpu_offload=True)
        out.append(
            "FSDP2 CPU offload of every sharded network (parameters, gradients, AdamW states, EMA, "
            f"teacher): module.parallel.cpu_offload=true: {gib(q)}, "
            f"{q.host * p.gpus / GIB:.0f} GiB of host memory in all"
        )
    dmd = getattr(module, "dmd_config", None)
    if dmd is not None and dmd.teacher_dtype != "bfloat16":
        out.append("bf16 teacher: module.dmd.teacher_dtype=bfloat16 (halves its block linears)")
    if dmd is not None and not lay.teacher_offload and "teacher" in mem.frozen and lora is None:
        q = _with(p, mem, lay, teacher_offload=True)
        out.append(f"teacher in host memory (module.dmd.teacher_offload=true): {gib(q)}")
    states = cfg.module.get("optim", {}).get("states", None)
    if states is not None and mem.optimizer:
        for kind in ("bfloat16", "8bit"):
            if OPTIM_STATE_BYTES[kind] < OPTIM_STATE_BYTES.get(str(states), 8):
                q = _with(p, _scaled_optimizer(mem, OPTIM_STATE_BYTES[kind]), lay)
                out.append(f"AdamW states in {kind}: module.optim.states={kind}: {gib(q)}")
    if lay.strategy == "fsdp2" and lay.cp == 1:
        heads = module.model_config.num_heads_kv
        for cp in (2, 4, 8):
            if p.gpus % cp or heads % cp:
                continue
            q = _with(p, mem, lay, cp=cp)
            out.append(
                f"context parallelism over {cp} GPUs (strategy.context_parallel={cp}: each holds 1/{cp} of "
                f"every sample's sequence; {p.gpus // cp} data-parallel groups): {gib(q)} "
                "(activations scaled; re-plan with it to measure)"
            )
            if q.fits:
                break
    if mem.ema:
        q = _with(p, _without_ema(mem), lay)
        out.append(f"no EMA (callbacks.ema=null): {gib(q)}")
    if lora is None:
        out.append(
            "LoRA instead of full fine-tuning: plan recipe=lora_base (a frozen bf16 base, float32 adapters)"
        )
    return out


def _without_ema(mem: StepMemory) -> StepMemory:
    from dataclasses import replace

    return replace(mem, ema=0)
