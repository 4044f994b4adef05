"""GPU-only checks: DeepSpeed ZeRO-2/3 and bf16 FSDP2 training steps, compiled flex attention
(forward, and the training backward through local-attention BlockMasks).

Lightning's DeepSpeedStrategy (and FSDP1) refuse a CPU, so these run only where CUDA is present
(the `gpu` marker skips them elsewhere). World size 1 is enough to exercise the code paths:
sharded init, partitioned parameters, strategy checkpoints and their export. They run, with the
benchmarks, from `scripts/gpu_checks.sh`, whose CPU dry run is the one test here that runs anywhere.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO, compose_train, tiny_run

from magitrain.checkpoint import load_official
from magitrain.checkpoint.export import export
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, SequenceLayout, attention


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_training_step_and_export_on_gpu(strategy, latent_shards, tmp_path):
    ema = ["callbacks.ema=null"] if strategy == "deepspeed_zero3" else []  # EMA refuses ZeRO-3
    overrides = tiny_run(
        latent_shards,
        "trainer=gpu",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"strategy={strategy}",
        "module.parallel.activation_checkpointing=true",
        *ema,
    )
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 3
    if trainer.lightning_module.ema is not None:  # float32 under bf16 FSDP2 and DeepSpeed's bf16 cast
        assert all(p.dtype == torch.float32 for p in trainer.lightning_module.ema.parameters())
    out = export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "export", ema=False)
    load_official(MagiHumanDiT(trainer.lightning_module.model_config), out)


@pytest.mark.gpu
def test_compiled_flex_attention_matches_the_dense_mask_on_gpu():
    layout = SequenceLayout(2, 5, 4, 6, 17, 9, torch.tensor([9, 4]))
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 8, layout.seq_len, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (
        torch.randn(2, 2, layout.seq_len, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    for window in (None, 1):
        dense = attention(q, k, v, layout.dense_mask(window, "cuda"), backend="sdpa")
        flex = attention(q, k, v, layout.block_mask(window, "cuda"), backend="flex")
        torch.testing.assert_close(flex.float(), dense.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash3", "flash2"])
def test_flash_attention_matches_sdpa_on_gpu(backend):
    from magitrain.model.attention import FLASH_INSTALLED, FLASH_MODULES

    if not FLASH_INSTALLED[backend]:
        pytest.skip(f"{FLASH_MODULES[backend]} is not installed")
    if backend == "flash3" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 runs on Hopper GPUs only")
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 8, 1000, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 1000, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    flash = attention(q, k, v, backend=backend)
    sdpa = attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)
    expected = (
        "flash3" if FLASH_INSTALLED["flash3"] and torch.cuda.get_device_capability()[0] == 9 else "flash2"
    )
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend=expected), atol=0, rtol=0)


@pytest.mark.gpu
def test_offload_stages_on_gpu_same_output_and_peak_memory():
    from magitrain.codecs import build_tiny_codecs
    from magitrain.inference import MagiHumanPipeline
    from magitrain.model import get_config

    torch.manual_seed(0)
    base, sr = MagiHumanDiT(get_config("tiny")).eval(), MagiHumanDiT(get_config("tiny")).eval()
    codecs = build_tiny_codecs(video_decoder="turbo")
    options = dict(seconds=0.32, resolution="64x32", sr="128x64", seed=3)
    outputs = []
    for offload in ("none", "stages"):
        nets = [n.cuda() if offload == "none" else n for n in (base, sr)]
        pipe = MagiHumanPipeline(*nets[:1], codecs, nets[1], device="cuda", precision="fp32", offload=offload)
        result = pipe.generate("a dog barks", **options)
        assert set(result.timings["peak_gib"]) >= {"text", "base", "sr", "decode"}
        outputs.append(result.video)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    assert next(base.parameters()).device.type == "cpu" and next(base.parameters()).is_pinned()


@pytest.mark.gpu
def test_turbo_vaed_bf16_on_gpu_matches_fp32_cpu():
    from magitrain.codecs.tiny import tiny_turbo_vaed

    torch.manual_seed(0)
    model = tiny_turbo_vaed().eval()
    z = torch.randn(1, 48, 9, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.decode(z)
        gpu = model.cuda().to(torch.bfloat16).decode(z.cuda().bfloat16())
    assert gpu.shape == reference.shape == (1, 3, 33, 64, 96)
    torch.testing.assert_close(gpu.float().cpu(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.slow
def test_gpu_checks_dry_run_covers_every_section(tmp_path):
    """The GPU script's code paths at toy size on the CPU, so that a GPU call does not die on a typo."""
    cmd = [str(REPO / "scripts" / "gpu_checks.sh"), "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_checks.json").read_text())
    sections = {"tests", "slice", "training", "dmd_slice", "plan_vs_gpu", "table2", "decode", "step_compile"}
    assert set(results) == {"machine"} | sections
    assert all("error" not in v for v in results.values()), results
    gpu_files = {"test_gpu", "test_dmd_offload", "test_lora", "test_lora_dmd", "test_codecs_offload"}
    found = set(results["tests"]["result"]["files"])
    assert {f"tests/{name}.py" for name in gpu_files} <= found  # every gpu-marked test of the suite
    dmd = results["dmd_slice"]["result"]
    assert dmd["critic_phase_s"] > 0 and dmd["generator_phase_s"] > 0
    assert results["plan_vs_gpu"]["result"]["plan_gib"] > 0
    assert results["slice"]["result"]["compiled"]["compile"] is True
    assert results["training"]["result"]["fsdp2"]["perf/tokens_per_s"] > 0
    assert [r["output"] for r in results["table2"]["result"]["rows"]] == ["64x64", "128x128"]
    assert results["table2"]["result"]["sr1080_masks"]["seq_len"] == 65280 + 126 + 100
    assert "| output |" in (tmp_path / "gpu_checks.md").read_text()
    steps = results["step_compile"]["result"]
    assert steps["step"]["warmup_s"]["base"] > 0 and not steps["step"]["graph_breaks"]


@pytest.mark.gpu
def test_flex_block_mask_training_backward_matches_the_dense_mask_on_gpu():
    """The 1080p SR model's local layers under the compiled flex BlockMask: loss.backward() gives
    the gradients of the dense-mask reference (CPU flex attention has no backward, so only here)."""
    from magitrain.model import tiny_sr1080

    config = tiny_sr1080()  # local attention in layers 0-2, window 1
    torch.manual_seed(0)
    dense = MagiHumanDiT(config.replace(attn_backend="sdpa")).cuda()
    flex = MagiHumanDiT(config.replace(attn_backend="flex")).cuda()
    flex.load_state_dict(dense.state_dict())
    g = torch.Generator("cuda").manual_seed(1)
    video = torch.randn(2, 48, 5, 4, 6, generator=g, device="cuda")  # 5 frames: the window of 1 cuts
    audio = torch.randn(2, 17, 64, generator=g, device="cuda")
    text = torch.randn(2, 9, 64, generator=g, device="cuda")
    text_len = torch.tensor([9, 4], device="cuda")  # padded text too
    target = torch.randn(2, 48, 5, 4, 6, generator=g, device="cuda")
    outs, grads = [], []
    for model in (dense, flex):
        inputs = [x.clone().requires_grad_() for x in (video, audio)]
        v, a = model(*inputs, text, text_len=text_len)
        ((v - target).pow(2).mean() + a.pow(2).mean()).backward()
        outs.append(v.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()} | {"video": inputs[0].grad})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    assert grads[1].keys() == grads[0].keys()
    for name, ref in grads[0].items():
        assert ref is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], ref, atol=1e-4, rtol=1e-3, msg=name)
    # the local layers really are local: the dense reference differs from all-global attention
    full = MagiHumanDiT(config.replace(local_attn_layers=(), attn_backend="sdpa")).cuda()
    full.load_state_dict(dense.state_dict())
    assert not torch.allclose(full(video, audio, text, text_len=text_len)[0], outs[0], atol=1e-3)
