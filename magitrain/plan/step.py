"""One training step of a recipe's LightningModule under PyTorch's MemTracker, on fake or real tensors.

The same function measures the plan (FakeTensorMode: no memory is allocated, a 15B step runs on
a laptop) and the real run it is checked against (real tensors, same tracker), so the two differ
only in whether storage exists.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from magitrain.callbacks.ema import EMA
from magitrain.errors import UserError
from magitrain.recipes.optim import build_adamw


@dataclass
class StepMemory:
    """Bytes of one process (no sharding), by role."""

    params: int  # trained network (float32 master weights)
    grads: int
    optimizer: int  # AdamW moments and step counters
    ema: int  # float32 shadow of the trained network
    frozen: int  # frozen networks other than the EMA (teacher, critic's frozen parts)
    buffers: int
    peak: int  # tracker's peak total over forward, backward, optimiser step and EMA update
    activations: int  # peak of activations + temporaries over forward and backward


def synthetic_batch(model_config, batch_size: int, latent_shape: tuple[int, int, int], text_len: int) -> dict:
    """A latent batch of the shapes the DataModule yields for one bucket (values are irrelevant)."""
    T, H, W = latent_shape
    frames = 4 * (T - 1) + 1  # one audio latent step per video frame (data/buckets.py)
    return {
        "video_latent": torch.randn(batch_size, model_config.latent_channels, T, H, W),
        "audio_latent": torch.randn(batch_size, frames, model_config.audio_in_channels),
        "text_emb": torch.randn(batch_size, text_len, model_config.text_in_channels),
        "text_len": torch.full((batch_size,), text_len, dtype=torch.long),
        "key": [f"plan{i}" for i in range(batch_size)],
    }


class _PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peaks (unused here) walk every
    tracked module on every op, which dominates a 40-layer step."""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        key = (id(st), t.device)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _autocast(precision: str, cache: bool):
    """Lightning's bf16-mixed autocast. Its weight-cast cache holds a bf16 copy of every weight
    through the forward without sharding; FSDP2 gathers bf16 blocks instead (nothing to cache),
    so a sharded plan runs without the cache and adds the gathered blocks itself."""
    if str(precision).startswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


def _full_text(module, args, kwargs):
    return args, {**kwargs, "text_len": None}


def training_loss(module, batch: dict) -> torch.Tensor:
    """The recipe's loss for one batch, without the Lightning logging its training_step does."""
    if hasattr(module, "flow_loss"):
        return module.flow_loss(batch)["loss"]
    raise UserError(
        f"the planner cannot plan {type(module).__name__} yet (it runs flow-matching steps: "
        "recipe=base_pretrain or an SR model); plan the base recipe for now"
    )


def measure_step(
    module,
    batch_size: int,
    latent_shape,
    text_len: int,
    precision: str,
    fake: bool,
    autocast_cache: bool = True,
) -> StepMemory:
    """Build the module's networks (with the EMA shadow the default callbacks keep), then run
    forward, backward, AdamW step and EMA update under MemTracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() if fake else nullcontext():
        module.request_ema()
        module.configure_model()
        optimizer = build_adamw(module.model.parameters(), module.optim_config, torch.device("cpu"))
        batch = synthetic_batch(module.model_config, batch_size, latent_shape, text_len)
        # Every planned sample uses its whole prompt: text_len=None is the same computation without
        # the per-sample length the model would read back from the device (data-dependent on fakes).
        hook = module.model.register_forward_pre_hook(_full_text, with_kwargs=True)
        tracker = _PeakTracker()
        tracker.track_external(module, optimizer, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
        with tracker:
            with _autocast(precision, autocast_cache):
                loss = training_loss(module, batch)
            loss.backward()
            backward_peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
            optimizer.step()
            EMA().update(module, step=1)
            trained = [p for p in module.model.parameters() if p.requires_grad]
            grads = _nbytes(p.grad for p in trained if p.grad is not None)
            opt = _nbytes(
                t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
            )
            optimizer.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
        hook.remove()

    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    return StepMemory(
        params=_nbytes(trained),
        grads=grads,
        optimizer=opt,
        ema=_nbytes(module.ema.parameters()),
        frozen=_nbytes(frozen),
        buffers=_nbytes(module.buffers()),
        peak=next(iter(peak.values()))["Total"],
        activations=sum(backward_peak.get(k, 0) for k in ("Activation", "Temp")),
    )
