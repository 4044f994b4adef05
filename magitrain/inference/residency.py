"""Stage-wise residency: frozen networks wait in pinned host memory and visit the device only
while their stage runs, the next stage's weights being copied in on a side stream meanwhile.

Generation never changes a weight, so sending a network back costs nothing: its parameters and
buffers point at their host tensors again and the device copy is freed (no device-to-host copy).
Pinned host memory makes the host-to-device copies asynchronous, so a prefetch overlaps the
running stage's compute. This is how the 1080p pipeline (text encoder, base and SR DiTs of 15B
each, decoder) fits one 80 GB GPU: at most one DiT and the next stage's weights are resident.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn


class _Slot:
    """One parameter or buffer of a module: where it lives and its host tensor."""

    def __init__(self, owner: nn.Module, name: str, is_param: bool, host: Tensor):
        self.owner, self.name, self.is_param, self.host = owner, name, is_param, host

    def set(self, tensor: Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


class StageResidency:
    """`with residency.stage("base", prefetch="sr"): ...` runs with the base stage's modules on the
    device and starts copying the SR stage's modules in.

    `stages` maps a stage name to its modules (a module may serve several stages). `log` records
    ("load" | "prefetch" | "release", stage) in order, for tests and debugging.
    """

    def __init__(self, device: torch.device | str, stages: dict[str, list[nn.Module]]):
        self.device = torch.device(device)
        self.stages = {name: [m for m in modules if m is not None] for name, modules in stages.items()}
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: dict[int, list[_Slot]] = {}
        self._on_device: dict[int, torch.cuda.Event | None] = {}  # module id -> copy-done event
        self.log: list[tuple[str, str]] = []
        for modules in self.stages.values():
            for module in modules:
                if id(module) not in self._slots:
                    self._slots[id(module)] = self._to_host(module)

    def _to_host(self, module: nn.Module) -> list[_Slot]:
        slots, seen = [], set()
        for owner in module.modules():
            for kind, tensors in ((True, owner._parameters), (False, owner._buffers)):
                for name, tensor in tensors.items():
                    if tensor is None or (kind and id(tensor) in seen):  # tied weights: one slot
                        continue
                    seen.add(id(tensor))
                    host = tensor.detach().to("cpu")
                    if self.cuda:
                        host = host.pin_memory()
                    slot = _Slot(owner, name, kind, host)
                    slot.set(host)
                    slots.append(slot)
        return slots

    def _load(self, stage: str, stream) -> None:
        for module in self.stages.get(stage, ()):
            if id(module) in self._on_device:
                continue
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for slot in self._slots[id(module)]:
                    slot.set(slot.host.to(self.device, non_blocking=True))
                event = torch.cuda.Event() if stream is not None else None
                if event is not None:
                    event.record(stream)
            self._on_device[id(module)] = event

    def _wait(self, stage: str) -> None:
        """The compute stream waits for the stage's prefetched copies, and the allocator learns that
        the copies (made on the side stream) are used on the compute stream."""
        for module in self.stages.get(stage, ()):
            event = self._on_device.get(id(module))
            if event is None:
                continue
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for slot in self._slots[id(module)]:
                owner = slot.owner._parameters if slot.is_param else slot.owner._buffers
                owner[slot.name].record_stream(current)
            self._on_device[id(module)] = None

    def _release(self, stage: str, keep: str | None) -> None:
        kept = {id(m) for m in self.stages.get(keep, ())} if keep else set()
        for module in self.stages.get(stage, ()):
            if id(module) in kept or id(module) not in self._on_device:
                continue
            for slot in self._slots[id(module)]:
                slot.set(slot.host)
            del self._on_device[id(module)]

    @contextmanager
    def stage(self, name: str, prefetch: str | None = None):
        """A stage without modules here (e.g. the base DiT under `offload=codecs`) only prefetches."""
        known = name in self.stages
        if known:
            self._load(name, stream=None)
            self.log.append(("load", name))
            self._wait(name)
        if prefetch in self.stages:
            self._load(prefetch, stream=self._stream)
            self.log.append(("prefetch", prefetch))
        try:
            yield
        finally:
            if known:
                self._release(name, keep=prefetch)
                self.log.append(("release", name))

    def resident(self) -> set[str]:
        """Stages whose modules are all on the device now."""
        return {s for s, ms in self.stages.items() if ms and all(id(m) in self._on_device for m in ms)}
