"""One training step of a recipe's LightningModule under PyTorch's MemTracker, on fake or real tensors.

The same function measures the plan (FakeTensorMode: no memory is allocated, a 15B step runs on
a laptop) and the real run it is checked against (real tensors, same tracker), so the two differ
only in whether storage exists.

Nothing here is recipe-specific bookkeeping: the networks are the module's attributes that are
`nn.Module`s (children like `model` and `critic`, and frozen helpers kept out of the state dict
like the DMD-2 `teacher`), a parameter is trained when it requires grad, the optimisers are the
module's own `configure_optimizers`, and the EMA shadow is what the EMA callback averages. Only
the loss differs: a flow-matching step, or DMD-2's critic phase then generator phase.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker

from magitrain.callbacks.ema import EMA, ema_pairs
from magitrain.errors import UserError


@dataclass
class StepMemory:
    """Bytes of one process (no sharding). Per network (attribute name: model, critic, teacher):
    trained parameters, their gradients and optimiser states, and frozen parameters."""

    params: dict[str, int]  # trained parameters (float32 master weights)
    grads: dict[str, int]  # the most a network's gradients take in any phase
    optimizer: dict[str, int]  # AdamW moments and step counters of the network's parameters
    frozen: dict[str, int]  # frozen parameters (teacher; LoRA's base), EMA shadows excluded
    ema: int  # the shadow the EMA callback keeps (float32)
    buffers: int
    peak: int  # tracker's peak total over every phase, optimiser steps and EMA update
    activations: dict[str, int] = field(default_factory=dict)  # by phase: peak activations + temporaries
    phase_grads: dict[str, dict[str, int]] = field(default_factory=dict)  # the gradients each phase holds

    def total(self, role: str) -> int:
        value = getattr(self, role)
        return sum(value.values()) if isinstance(value, dict) else value


def synthetic_batch(
    model_config,
    batch_size: int,
    latent_shape: tuple[int, int, int],
    text_len: int,
    lr_latent_hw: tuple[int, int] | None = None,
    ref_len: int = 0,
) -> dict:
    """A latent batch of the shapes the DataModule yields for one bucket (values are irrelevant);
    with `lr_latent_hw` (SR) the low-resolution latent of the same frames, as `encode_shards.py --sr`;
    with `ref_len` a voice reference of that many latents for every sample (data.voice_reference)."""
    T, H, W = latent_shape
    frames = 4 * (T - 1) + 1  # one audio latent step per video frame (data/buckets.py)
    lr = {}
    if lr_latent_hw:
        lr["lr_video_latent"] = torch.randn(batch_size, model_config.latent_channels, T, *lr_latent_hw)
    if ref_len:
        lr["ref_audio_latent"] = torch.randn(batch_size, ref_len, model_config.audio_in_channels)
        lr["ref_audio_len"] = torch.full((batch_size,), ref_len, dtype=torch.long)
    return {
        **lr,
        "video_latent": torch.randn(batch_size, model_config.latent_channels, T, H, W),
        "audio_latent": torch.randn(batch_size, frames, model_config.audio_in_channels),
        "text_emb": torch.randn(batch_size, text_len, model_config.text_in_channels),
        "text_len": torch.full((batch_size,), text_len, dtype=torch.long),
        "key": [f"plan{i}" for i in range(batch_size)],
    }


class _NoHook:
    def remove(self) -> None:
        pass


class _PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peaks (unused here) walk every
    tracked module on every op, which dominates a 40-layer step."""

    overall_peak = 0  # over every phase (`reset_phase` starts a phase's own peak)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            self.overall_peak = max(self.overall_peak, snap["Total"])
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        """MemTracker hooks every parameter's gradient, and a frozen one takes no hook (torch 2.11
        raises for the teacher's and a LoRA base's): mark those as hooked already."""
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        """A network called again from the top (the DMD-2 student's sampler steps, the teacher's two
        branches) starts its per-module stats afresh (MemTracker refuses a second call as a new
        iteration); the global memory accounting, the only one read here, is unaffected."""
        if not self._mod_tracker.is_bw and module in self.memory_tracking:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def activations(self) -> int:
        """Peak activations + temporaries since the last `reset_phase` (the tracker's peak snapshot)."""
        snap = next(iter(self._peak_mem_snap.values()), {})
        return sum(snap.get(k, 0) for k in ("Activation", "Temp"))

    def reset_phase(self) -> None:
        """Start a new phase's peak from the current memory (the overall peak is kept by the caller)."""
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._curr_mem_snap.items()}
        self._peak_mem_snap = {dev: dict(snap) for dev, snap in self._curr_mem_snap.items()}


def _nbytes(tensors, seen: set | None = None) -> int:
    """Bytes of the distinct storages under `tensors` (and not in `seen`, which it extends): a
    tensor subclass (torchao's float8 weights) counts the storages it wraps, as MemTracker does."""
    seen, total = set() if seen is None else seen, 0
    for t in tensors:
        for st in get_untyped_storages(t):
            key = (st._cdata, st.device)  # the storage itself (its Python wrapper is made per call)
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
    full_reference = {"ref_len": None} if "ref_len" in kwargs else {}  # (every planned one is whole)
    return args, {**kwargs, "text_len": None, **full_reference}


def networks(module) -> dict[str, nn.Module]:
    """The module's networks by attribute name: its children and the frozen helpers it keeps out of
    its state dict (set with `object.__setattr__`, e.g. the DMD-2 teacher)."""
    found, seen = {}, set()
    candidates = [*module._modules.items(), *vars(module).items()]
    for name, m in candidates:
        # one network under two roles (a LoRA critic over the student's base) is counted once
        if isinstance(m, nn.Module) and id(m) not in seen:
            found[name] = m
            seen.add(id(m))
    return found


def _optimizers(module) -> list[torch.optim.Optimizer]:
    """The module's own `configure_optimizers`, read through Lightning's parser of its answer."""
    from lightning.pytorch.core.optimizer import _configure_optimizers

    optimizers, _, _ = _configure_optimizers(module.configure_optimizers())
    return optimizers


def _planning_trainer():
    """A real (unused) Trainer, so `configure_optimizers` can read `trainer.max_steps`."""
    import logging

    import lightning.pytorch as L

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        quiet.setLevel(level)


@contextmanager
def fake_process_group(world: int, cp: int = 1):
    """The device mesh the FSDP2 strategy builds for `world` ranks (dp x cp), over a fake process
    group (torch's "fake" backend: collectives return at once) in which this process is rank 0.
    FSDP2 then shards, gathers and reduce-scatters exactly as on a real rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("the planner runs in its own process (a process group is already initialised)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        if cp > 1:
            mesh = init_device_mesh(
                "cpu", (world // cp, cp), mesh_dim_names=("data_parallel", "context_parallel")
            )
            # the dp x cp mesh `parallelize` flattens, made here: the mesh's own index tensors are
            # real, and flattening under FakeTensorMode would mix them with fakes (it is cached)
            mesh["data_parallel", "context_parallel"]._flatten("dp_cp")
            yield mesh
        else:
            yield init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


# the optimiser config of each network (`module.optim.states`, `module.critic_optim.states`)
OPTIM_CONFIGS = {"optim_config": ("model",), "critic_optim_config": ("critic", "gan")}


@contextmanager
def _eight_bit_as_float32(module, fake: bool):
    """torchao's 8-bit AdamW states cannot be built on fake tensors (its quantiser reads values):
    a fake step runs float32 AdamW for them and yields the networks whose states are then counted
    by `moment_bytes`' rule of torchao's layout. The step's other memory is the same."""
    saved, names = {}, set()
    for attr, nets in OPTIM_CONFIGS.items():
        cfg = getattr(module, attr, None)
        if fake and cfg is not None and getattr(cfg, "states", "float32") == "8bit":
            saved[attr] = cfg
            setattr(module, attr, replace(cfg, states="float32"))
            names.update(nets)
    try:
        yield names
    finally:
        for attr, cfg in saved.items():
            setattr(module, attr, cfg)


def _eight_bit_bytes(params) -> int:
    """8-bit moments of each trained (local) tensor plus its float32 step counter."""
    from magitrain.recipes.low_precision_adamw import moment_bytes

    local = [p.to_local() if hasattr(p, "to_local") else p for p in params if p.requires_grad]
    return sum(moment_bytes("8bit", p.numel()) + 4 for p in local)


@contextmanager
def _from_config(module):
    """Build every network from its config, not from checkpoints: weights are irrelevant to memory,
    and a plan must not read 30 GB files. DMD-2 refuses to build without a teacher path."""
    build = module.build_network
    module.build_network = lambda init, *args, **kwargs: build(None, *args, **kwargs)
    # measured on the device: CPU offload is the planner's arithmetic (the same states, on the host)
    parallel = module.parallel_config
    module.parallel_config = replace(parallel, cpu_offload=False)
    saved = {k: getattr(module, k) for k in ("init_path", "teacher_path", "student_init", "critic_init")
             if hasattr(module, k)}  # fmt: skip
    for k in saved:
        setattr(module, k, "<planned>" if k == "teacher_path" else None)
    try:
        yield
    finally:
        del module.build_network
        module.parallel_config = parallel
        for k, v in saved.items():
            setattr(module, k, v)


def _lr_latent_hw(module, latent_shape) -> tuple[int, int] | None:
    """SR recipes: the latent (height, width) of their LR clip (`flow.lr_size` pixels, turned to the
    orientation of the clip's latent (T, H, W), as the recipe turns them)."""
    size = getattr(module, "lr_size", None)
    if size is None:
        return None
    from magitrain.data.buckets import Bucket
    from magitrain.inference.shapes import oriented_like

    width, height = oriented_like(size, (latent_shape[2], latent_shape[1]))
    return Bucket(height, width, 1, 1).latent_shape[1:]


class _Phases:
    """What a step function reports after each backward: the phase's peak activations (since the
    previous phase) and the gradient bytes each network then holds."""

    def __init__(self, tracker: _PeakTracker, nets: dict[str, list[nn.Parameter]]):
        self.tracker, self.nets = tracker, nets
        self.activations: dict[str, int] = {}
        self.grads: dict[str, dict[str, int]] = {}

    def __call__(self, phase: str) -> None:
        self.activations[phase] = self.tracker.activations()
        grads = {
            name: _nbytes(p.grad for p in params if p.grad is not None) for name, params in self.nets.items()
        }
        self.grads[phase] = {k: v for k, v in grads.items() if v}

    def next(self) -> None:
        self.tracker.reset_phase()


def flow_step(module, batch: dict, optimizers, phases: _Phases) -> None:
    """Forward and backward of the flow-matching loss (base, SR, LoRA), then the optimiser step."""
    if not hasattr(module, "flow_loss"):
        raise UserError(f"the planner has no step for {type(module).__name__} (flow matching or DMD-2)")
    # a LoRA base computes in bf16 whatever trainer.precision is (LoraMixin.base_autocast)
    base = module.base_autocast() if hasattr(module, "base_autocast") else nullcontext()
    with base:
        loss = module.flow_loss(batch)["loss"]
    loss.backward()
    phases("step")
    for opt in optimizers:
        opt.step()


def dmd2_step(module, batch: dict, optimizers, phases: _Phases) -> None:
    """One critic phase and one generator phase of `DMD2Module.training_step`, with its own methods.

    The backward simulation exits at its first step: the student calls before the exit run without
    grad and hold nothing once they return, so the exit step changes the time, not the peak.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from magitrain.flow import dmd as core
    from magitrain.flow import flow_grid

    cfg = module.dmd_config
    opt_student, opt_critic = optimizers
    ctx = module._context(batch)
    critic, student = (
        module._velocity(module.critic, ctx),
        module._velocity(module.model, ctx, route=module.token_route(batch, "tread/student")),
    )  # (TREAD: the routed forwards hold the smaller activations they hold in training)
    gan = getattr(module, "gan", None)
    critic_for_loss = module._critic_for_loss(
        ctx, route=module.token_route(batch, "tread/critic0") if gan is None else None
    )
    with unset_fake_temporarily():  # the grid is a list of numbers (a fake tensor has no values)
        sigmas = flow_grid(cfg.student_steps)[1][:-1].tolist()

    def simulate():
        ends, source = module._ends(ctx), module._source(ctx)  # (SR distillation: the SR source)
        return core.simulate(student, ends, sigmas, 0, generator=ctx["gens"], source=source)

    with torch.no_grad():
        x0 = simulate()
    s, eps = module._score_draw(ctx)
    if gan is None:
        loss, _ = core.critic_loss(critic_for_loss, x0, s=s, eps=eps, scored=ctx["scored"])
    else:  # the optional GAN term: the discriminator head trains with the critic
        loss, _ = module._critic_loss_with_gan(critic, ctx, x0, s, eps)
    loss.backward()
    phases("critic")
    critic_side = getattr(module, "_critic_side", module.critic)
    torch.nn.utils.clip_grad_norm_(
        [p for p in critic_side.parameters() if p.grad is not None], cfg.critic_clip
    )
    opt_critic.step()
    opt_critic.zero_grad(set_to_none=True)
    del loss, x0

    phases.next()
    x0 = simulate()
    s, eps = module._score_draw(ctx)
    weights = {"video": cfg.video_weight, "audio": cfg.audio_weight}
    if module.codecs is None and module._negative is None:
        # no codecs nor negative.safetensors here: a stand-in negative prompt as long as the batch's
        # text (its values do not matter to memory or time)
        text = ctx["text"]
        module._negative = (torch.zeros_like(text[:1]), torch.full((1,), text.shape[1], device=text.device))
    teacher = module._guided_teacher(ctx)
    loss, _ = core.generator_loss(x0, teacher, critic, s=s, eps=eps, weights=weights, scored=ctx["scored"])
    if gan is not None:
        loss = loss + module.gan.generator_loss(critic, x0, s=s, eps=eps)[0]
    loss.backward()
    phases("generator")
    torch.nn.utils.clip_grad_norm_(
        [p for p in module.model.parameters() if p.grad is not None], cfg.student_clip
    )
    opt_student.step()


def step_for(module):
    from magitrain.recipes.dmd2 import DMD2Module

    return dmd2_step if isinstance(module, DMD2Module) else flow_step


def fake_mode():
    """A FakeTensorMode in which networks can change dtype and device (`module.to`, `to_empty`).

    The mode memoises each op's output by weak reference, under the id of the fresh meta tensor it
    wraps (torch 2.11 `FakeTensorConverter.from_meta_and_device`, its only use of
    `set_tensor_memo`), and `Module._apply` swaps a fake parameter in place, which a weakly
    referenced tensor refuses ("Couldn't swap"). That meta tensor is never wrapped again, so the
    memo of op outputs is dropped; real-to-fake conversions keep theirs. The recipes' own code then
    builds, casts (`to_inference_dtype`) and materialises (`to_empty`) networks unchanged.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: small constants a recipe made before the mode (SR's sampler grid)
    # enter the step as fake constants
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    return mode


def measure_step(
    module,
    batch_size: int,
    latent_shape,
    text_len: int,
    precision: str,
    fake: bool,
    autocast_cache: bool = True,
    mesh=None,
    ref_len: int = 0,
) -> StepMemory:
    """Build the module's networks (with the EMA shadow the default callbacks keep) and optimisers,
    then run the recipe's step, optimiser steps and EMA update under MemTracker.

    With `mesh` (FSDP2: `fake_process_group`) the networks are sharded by the recipe's own FSDP2
    path and every figure is one rank's: local shards, gathered blocks, reduce-scatter buffers.
    """
    module.trainer = _planning_trainer()
    module._device_mesh = mesh  # (LightningModule.device_mesh: what ModelParallelStrategy sets)
    with fake_mode() if fake else nullcontext():
        module.request_ema()
        with _from_config(module):
            module.configure_model()
        with _eight_bit_as_float32(module, fake) as eight_bit:
            optimizers = _optimizers(module)
        lr_hw = _lr_latent_hw(module, latent_shape)
        batch = synthetic_batch(module.model_config, batch_size, latent_shape, text_len, lr_hw, ref_len)
        nets = networks(module)
        # Every planned sample uses its whole prompt: text_len=None is the same computation without
        # the per-sample length the model would read back from the device (data-dependent on fakes).
        hooks = [n.register_forward_pre_hook(_full_text, with_kwargs=True) for n in nets.values()]
        tracker = _PeakTracker()
        tracker.track_external(module, *nets.values(), *optimizers)
        tracker.track_external(*[v for v in batch.values() if isinstance(v, torch.Tensor)])
        # the parameters as built (FSDP2: the sharded ones the optimisers hold; a network may hold
        # its gathered ones between forward and backward)
        params = {name: list(net.parameters()) for name, net in nets.items()}
        phases = _Phases(tracker, params)
        with tracker:
            with _autocast(precision, autocast_cache):
                step_for(module)(module, batch, optimizers, phases)
            EMA().update(module, step=1)
            memory = _states(module, params, nets, optimizers)
            for name in eight_bit & memory.optimizer.keys():
                memory.optimizer[name] = _eight_bit_bytes(params[name])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
    memory.activations, memory.phase_grads = phases.activations, phases.grads
    memory.grads = {k: max(g.get(k, 0) for g in phases.grads.values()) for k in memory.params}
    memory.peak = tracker.overall_peak
    return memory


def _states(module, params_of: dict[str, list], nets: dict[str, nn.Module], optimizers) -> StepMemory:
    shadow = ema_pairs(module)[0] if module.ema is not None or hasattr(module, "ema_parameters") else []
    shadow_ids = {id(p) for p in shadow}
    owner = {id(p): name for name, ps in params_of.items() for p in ps}
    params, frozen, opt = {}, {}, {}
    counted = set()  # storages shared by networks (LoRA-DMD: one frozen base) count once
    for name, ps in params_of.items():
        own = [p for p in ps if id(p) not in shadow_ids]
        trained = _nbytes((p for p in own if p.requires_grad), counted)
        if trained:
            params[name] = trained
        rest = _nbytes((p for p in own if not p.requires_grad), counted)
        if rest:
            frozen[name] = rest
    for o in optimizers:
        for p, state in o.state.items():
            name = owner[id(p)]
            opt[name] = opt.get(name, 0) + _nbytes(t for t in state.values() if isinstance(t, torch.Tensor))
    return StepMemory(
        params=params,
        grads={},  # (what the phases saw)
        optimizer=opt,
        frozen=frozen,
        ema=_nbytes(shadow),
        buffers=_nbytes(b for net in nets.values() for b in net.buffers()),
        peak=0,
    )
