"""Per-GPU memory plan of a training config: a measured fake step, then sharding and fit arithmetic.

Measured (MemTracker on a real step of fake tensors, `step.py`): parameters, gradients, optimiser
states, EMA, frozen networks (exact), and peak activations of one process. Computed: the share
each GPU keeps under the strategy's sharding, the blocks FSDP2 gathers, a fragmentation margin.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig

from magitrain.data.buckets import parse_buckets
from magitrain.errors import UserError

from .step import measure_step

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
FRAGMENTATION = 0.10  # caching-allocator slack on top of the tracked peak (rough, as torchtitan's 10%)
# which per-process states a strategy divides over the ranks
SHARDED = {
    "fsdp2": {"params", "grads", "optimizer", "ema"},
    "deepspeed_zero3": {"params", "grads", "optimizer", "ema"},
    "deepspeed_zero2": {"grads", "optimizer"},
}
GIB = 1024**3


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", str(text))
    if not m:
        raise UserError(f"gpu_memory={text!r}: expected a size like 80GB")
    return int(float(m.group(1)) * GIB)  # a card's "80GB" is 80 GiB of device memory


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
    per_gpu: dict = field(default_factory=dict)  # bytes by role on one GPU
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


def plan(
    overrides: list[str], gpus: int, gpu_memory: int, bucket: dict | None = None, fake: bool = True
) -> Plan:
    cfg = compose(overrides)
    bucket = bucket or largest_bucket(cfg)
    from magitrain.data.buckets import Bucket

    latent = Bucket(bucket["height"], bucket["width"], bucket["frames"], bucket["batch_size"]).latent_shape
    strategy = cfg.strategy.name
    sharded = SHARDED.get(strategy, set())
    module = hydra.utils.instantiate(cfg.module)
    mem = measure_step(
        module,
        bucket["batch_size"],
        latent,
        int(cfg.data.get("text_max_len", 640)),
        str(cfg.trainer.precision),
        fake=fake,
        autocast_cache=not sharded,
    )
    world = max(1, gpus)
    # FSDP2 CPU offload keeps every sharded state in host memory
    offloaded = strategy == "fsdp2" and module.parallel_config.cpu_offload
    per_gpu = {}
    for role in ("params", "grads", "optimizer", "ema"):
        per_gpu[role] = getattr(mem, role) // world if role in sharded else getattr(mem, role)
        per_gpu[role] *= not offloaded
    per_gpu["frozen"] = mem.frozen
    per_gpu["activations"] = mem.activations
    if strategy == "fsdp2":
        # the bf16 blocks FSDP2 gathers: the running one and the prefetched next, plus the
        # running block's unsharded float32 gradient before its reduce-scatter
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in module.model.block.layers)
        per_gpu["gathered_blocks"] = largest * (2 * 2 + 4)
    subtotal = sum(per_gpu.values())
    per_gpu["fragmentation"] = int(subtotal * FRAGMENTATION)
    total = subtotal + per_gpu["fragmentation"]
    p = Plan(
        recipe=str(cfg.recipe_name),
        model=str(cfg.model.name),
        strategy=strategy,
        gpus=gpus,
        gpu_memory=gpu_memory,
        bucket=bucket,
        per_gpu=per_gpu,
        total=total,
        fits=total <= gpu_memory,
    )
    # activations grow with the batch (measured at the bucket's batch size, scaled linearly)
    per_sample = mem.activations / bucket["batch_size"]
    fixed = subtotal - mem.activations
    room = gpu_memory / (1 + FRAGMENTATION) - fixed
    p.largest_batch = max(0, int(room // per_sample)) if per_sample else 0
    p.suggestions = suggest(p, mem, module, sharded)
    return p


def suggest(p: Plan, mem, module, sharded: set) -> list[str]:
    """Settings that bring the total under the card, each with the total it gives (same arithmetic)."""
    out = []
    margin = 1 + FRAGMENTATION
    base = p.total / margin
    if p.fits:
        return out
    if not module.model.activation_checkpointing or module.model.checkpoint_every > 1:
        out.append(
            "activation checkpointing of every block: module.parallel.activation_checkpointing=true "
            "module.parallel.checkpoint_every=1 (re-plan to size it)"
        )
    host = sum(p.per_gpu[role] for role in ("params", "grads", "optimizer", "ema"))
    if host and p.strategy == "fsdp2":
        t = (base - host) * margin
        out.append(
            "CPU offload of the sharded parameters, gradients, AdamW states and EMA "
            f"(module.parallel.cpu_offload=true): ~{t / GIB:.1f} GiB per GPU, "
            f"{host * p.gpus / GIB:.0f} GiB of host memory in all"
        )
    if p.strategy not in SHARDED:
        out.append("shard the states: strategy=fsdp2")
    for cp in (2, 4, 8):
        t = (base - p.per_gpu["activations"] + p.per_gpu["activations"] / cp) * margin
        if t <= p.gpu_memory:
            out.append(
                f"context parallel degree {cp} (strategy=fsdp2 strategy.context_parallel={cp}; "
                f"activations / {cp}): ~{t / GIB:.1f} GiB"
            )
            break
    if p.per_gpu["ema"]:
        t = (base - p.per_gpu["ema"]) * margin
        out.append(f"no EMA (callbacks.ema=null) or EMA on CPU: ~{t / GIB:.1f} GiB")
    return out
