"""The precision rules of the release, checked at every boundary with forward hooks, under plain bf16
autocast, FSDP2's mixed-precision policy (two gloo processes) and DeepSpeed's bf16 module cast.

The release computes the residual stream, norms, RoPE, gates, activations, embedders and heads in
float32, and the block matmuls and attention in bf16. An output bound against the bf16 fixture
cannot tell (a pure float32 model is as close as a bf16 one), so these tests look at the dtypes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import magitrain.model.layers as layers_module
from magitrain.checkpoint import load_official
from magitrain.model import MagiHumanDiT, golden_tiny
from magitrain.model.layers import Float32Linear, ModalityLinear, RMSNorm, TransformerLayer
from magitrain.model.rope import RotaryEmbedding

F32, BF16 = torch.float32, torch.bfloat16
GOLDEN = "forward_base_v2"


def record_dtypes(model: MagiHumanDiT, monkeypatch=None) -> dict[str, set]:
    """Install hooks that collect, per boundary, the set of dtypes seen during forwards."""
    seen: dict[str, set] = defaultdict(set)

    def hook(name, fn):
        return lambda mod, args, out: seen[name].update(fn(mod, args, out))

    for m in model.modules():
        if isinstance(m, TransformerLayer):
            m.register_forward_hook(hook("residual", lambda m, a, o: {a[0].dtype, o.dtype}))
        elif isinstance(m, RMSNorm):
            m.register_forward_hook(hook("norm", lambda m, a, o: {o.dtype}))
            m.register_forward_hook(hook("norm_weight", lambda m, a, o: {m.weight.dtype}))
        elif isinstance(m, RotaryEmbedding):
            m.register_forward_hook(hook("rope", lambda m, a, o: {o.dtype}))
        elif isinstance(m, Float32Linear):
            m.register_forward_hook(hook("embedders_heads", lambda m, a, o: {o.dtype}))
        elif isinstance(m, ModalityLinear):
            m.register_forward_hook(hook("block_matmul", lambda m, a, o: {o.dtype}))
    for layer in model.block.layers:  # inputs of the projections after the gate and the activation
        layer.attention.linear_proj.register_forward_hook(hook("gate", lambda m, a, o: {a[0].dtype}))
        layer.mlp.down_proj.register_forward_hook(hook("activation", lambda m, a, o: {a[0].dtype}))
    real = layers_module.attention

    def spy(q, k, v, mask=None, backend="auto"):
        out = real(q, k, v, mask, backend)
        seen["attention"].add(out.dtype)
        return out

    if monkeypatch is not None:
        monkeypatch.setattr(layers_module, "attention", spy)
    else:
        layers_module.attention = spy
    return seen


RULES = {
    "residual": {F32},
    "norm": {F32},
    "norm_weight": {F32},  # as gathered for the forward (FSDP2: its own float32 unit)
    "rope": {F32},
    "embedders_heads": {F32},
    "gate": {F32},
    "activation": {F32},
    "block_matmul": {BF16},
    "attention": {BF16},
}


def assert_release_precision(seen: dict[str, set], **storage) -> None:
    rules = {**RULES, **storage}
    assert {k: seen.get(k) for k in rules} == rules


def golden_inputs(golden_dir: Path) -> tuple[dict, dict]:
    return load_file(golden_dir / f"{GOLDEN}.safetensors"), {"coords_style": "v2"}


def run_golden(model, fx) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(
            fx["in.video_latent"],
            fx["in.audio_latent"],
            fx["in.text_embed_padded"],
            text_len=fx["in.text_len"].reshape(1),
            coords_style="v2",
        )


def rms_rel(out, ref) -> float:
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def assert_follows_release(outputs, fx) -> None:
    v_video, v_audio = outputs
    assert v_video.dtype == F32 and v_audio.dtype == F32
    assert rms_rel(v_video, fx["out.video_velocity"]) <= 2e-2
    assert rms_rel(v_audio, fx["out.audio_velocity"]) <= 2e-2


def golden_model(golden_dir) -> MagiHumanDiT:
    return load_official(MagiHumanDiT(golden_tiny()), golden_dir / "weights_tiny.safetensors")


def test_precision_rules_under_autocast(golden_dir, monkeypatch):
    model = golden_model(golden_dir)
    seen = record_dtypes(model, monkeypatch)
    fx, _ = golden_inputs(golden_dir)
    with torch.autocast("cpu", dtype=BF16):
        outputs = run_golden(model, fx)
    assert_release_precision(seen)
    assert_follows_release(outputs, fx)


def test_float32_model_breaks_the_rules(golden_dir, monkeypatch):
    """The hooks can fail: a pure float32 forward has no bf16 matmuls."""
    model = golden_model(golden_dir)
    seen = record_dtypes(model, monkeypatch)
    run_golden(model, golden_inputs(golden_dir)[0])
    assert seen["block_matmul"] == {F32}


def deepspeed_bf16_cast(model: torch.nn.Module) -> torch.nn.Module:
    """What DeepSpeed's engine does to the module in bf16 mode (`_cast_module_mixed_precision`):
    every floating parameter becomes bf16; buffers keep their dtype (older releases cast them too,
    so the RoPE buffer is cast here as well, the harder case)."""
    for p in model.parameters():
        p.data = p.data.to(BF16)
    for b in model.buffers():
        b.data = b.data.to(BF16)
    return model


def test_deepspeed_bf16_module_follows_the_rules(golden_dir, monkeypatch):
    """Lightning's DeepSpeed bf16-mixed runs the bf16-cast module without autocast. Every parameter
    is stored in bf16 there (float32 master weights live in the optimiser); the computation still
    follows the release."""
    from lightning.pytorch.plugins.precision.deepspeed import DeepSpeedPrecision

    model = deepspeed_bf16_cast(golden_model(golden_dir))
    seen = record_dtypes(model, monkeypatch)
    fx, _ = golden_inputs(golden_dir)
    with DeepSpeedPrecision("bf16-mixed").forward_context():
        outputs = run_golden(model, fx)
    assert_release_precision(seen, norm_weight={BF16})
    assert_follows_release(outputs, fx)


def test_deepspeed_bf16_module_trains(golden_dir):
    model = deepspeed_bf16_cast(golden_model(golden_dir))
    fx, _ = golden_inputs(golden_dir)
    v, a = model(fx["in.video_latent"], fx["in.audio_latent"], fx["in.text_embed_padded"])
    (v.square().mean() + a.square().mean()).backward()
    assert all(p.grad is not None and p.grad.dtype == BF16 for p in model.parameters())


# ----- FSDP2 with bf16 gathered parameters, two gloo processes ------------------------------------
def _fsdp2_worker(rank: int, world: int, store: str, golden_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from magitrain.parallel import ParallelConfig, parallelize

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = golden_model(Path(golden_dir))
        mesh = init_device_mesh("cpu", (world,))
        parallelize(model, ParallelConfig(param_dtype="bfloat16"), mesh)
        seen = record_dtypes(model)
        fx, _ = golden_inputs(Path(golden_dir))
        with torch.autocast("cpu", dtype=BF16):  # Lightning's bf16-mixed on a CPU
            v_video, v_audio = run_golden(model, fx)
        if rank == 0:
            torch.save({"seen": dict(seen), "video": v_video, "audio": v_audio}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_policy_follows_the_rules(golden_dir, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "store"), str(golden_dir), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert_release_precision(result["seen"])
    fx, _ = golden_inputs(golden_dir)
    assert_follows_release((result["video"], result["audio"]), fx)


def test_fsdp2_policies_cast_no_forward_inputs():
    """The rule the FSDP2 test guards: FSDP2's default policy casts forward inputs; ours must not."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from magitrain.parallel import ParallelConfig
    from magitrain.parallel.parallelize import mixed_precision_policies

    assert MixedPrecisionPolicy(param_dtype=BF16).cast_forward_inputs  # the default we must override
    linears, float32 = mixed_precision_policies(ParallelConfig())
    assert not linears.cast_forward_inputs and not float32.cast_forward_inputs
    assert linears.param_dtype == BF16 and float32.param_dtype == F32
