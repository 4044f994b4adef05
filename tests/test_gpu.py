"""GPU-only checks: DeepSpeed ZeRO-2/3 and bf16 FSDP2 training steps, compiled flex attention
(forward, and the training backward through local-attention BlockMasks).

Lightning's DeepSpeedStrategy (and FSDP1) refuse a CPU, so these run only where CUDA is present
(the `gpu` marker skips them elsewhere). World size 1 is enough to exercise the code paths:
sharded init, partitioned parameters, strategy checkpoints and their export. They run, with the
benchmarks, from `scripts/gpu_checks.sh`, whose CPU dry run is the one test here that runs anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


PRIORITY = ["table2", "slice", "tests", "dmd_slice", "plan_vs_gpu"]  # issue 22: the headline figures first


def gpu_checks_module():
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_checks

    return gpu_checks


@pytest.mark.slow
def test_gpu_checks_dry_run_covers_every_section_in_priority_order(tmp_path):
    """The GPU script's code paths at toy size on the CPU, so that a GPU call does not die on a typo;
    the sections run in the priority order of issue 22 and end in one summary table."""
    names = [s.name for s in gpu_checks_module().SECTIONS]
    assert names[: len(PRIORITY)] == PRIORITY
    # a loaded CPU may take longer than the dry estimates: a large budget, so that every section runs
    cmd = [str(REPO / "scripts" / "gpu_checks.sh"), "--dry-run", "--budget-s", "3000", "--out", str(tmp_path)]
    env = {**os.environ, "GPU_CHECKS_TIMEOUT_S": "1500"}  # the wrapper's net under the budget
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert list(results) == ["machine", *names]  # written in the order they ran
    assert all("error" not in v and "skipped" not in v for v in results.values()), results
    gpu_files = {"test_gpu", "test_dmd_offload", "test_lora", "test_lora_dmd", "test_codecs_offload"}
    found = set(results["tests"]["result"]["files"])
    assert {f"tests/{name}.py" for name in gpu_files} <= found  # every gpu-marked test of the suite
    dmd = results["dmd_slice"]["result"]
    assert dmd["critic_phase_s"] > 0 and dmd["generator_phase_s"] > 0
    assert results["plan_vs_gpu"]["result"]["plan_gib"] > 0
    assert results["training"]["result"]["fsdp2_plan"]["plan_gib"] > 0
    assert results["slice"]["result"]["compile"] and not results["slice_eager"]["result"]["compile"]
    assert results["training"]["result"]["fsdp2"]["perf/tokens_per_s"] > 0
    assert results["tread"]["result"]["computed_flops_ratio"] < 1  # the routed step computes less
    table2 = results["table2"]["result"]
    assert [(r["output"], r["decoder"]) for r in table2["rows"]] == [
        ("64x64", "wan"), ("128x128", "wan"), ("128x128:2", "wan")
    ]  # fmt: skip
    assert [r.get("sr_steps") for r in table2["rows"]] == [None, 5, 2]  # the 2-step distilled SR row
    assert {r["decoder"] for r in results["table2_540p"]["result"]["rows"]} == {"wan"}
    assert table2["sr1080_masks"]["seq_len"] == 65280 + 126 + 100
    report = (tmp_path / "gpu_checks.md").read_text()
    assert "| output |" in report
    rows = report.splitlines()[-len(names) :]  # the summary table ends the report
    assert [row.split(" | ")[1:3] for row in rows] == [[n, "ok"] for n in names]
    steps = results["step_compile"]["result"]
    assert steps["step"]["warmup_s"]["base"] > 0 and not steps["step"]["graph_breaks"]


def test_gpu_checks_skip_what_their_estimate_says_will_not_fit_and_stop_at_the_budget(tmp_path):
    """The budget: a section whose recorded estimate exceeds what is left is skipped (a later one that
    fits still runs), the results are written after every section, and at the budget the running
    section is cut short (SIGALRM) and the rest skipped, so an 8-minute call ends in 8 minutes."""
    gpu_checks = gpu_checks_module()
    ran, writes = [], []

    def section(name, estimate_s, seconds=0.0):
        def run(checks):
            ran.append(name)
            time.sleep(seconds)
            return {"name": name}

        return gpu_checks.Section(name, run, estimate_s=estimate_s, dry_estimate_s=estimate_s)

    results = {}
    checks = gpu_checks.Checks(tmp_path, dry=True, results=results)
    sections = [section("a", 1), section("b", 100), section("c", 2)]
    gpu_checks.run_sections(sections, checks, budget_s=10, write=lambda: writes.append(list(results)))
    assert ran == ["a", "c"] and writes == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert results["b"]["skipped"].startswith("estimate 100 s > ") and results["c"]["result"] == {"name": "c"}
    assert gpu_checks.summary(results, sections)[2:] == [
        f"| 1 | a | ok | {results['a']['seconds']} | 1 |",
        f"| 2 | b | skipped: {results['b']['skipped']} | - | 100 |",
        f"| 3 | c | ok | {results['c']['seconds']} | 2 |",
    ]

    ran.clear()
    results.clear()
    saved = signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGTERM)
    try:
        gpu_checks.stop_at_budget(0.5)
        start = time.perf_counter()
        gpu_checks.run_sections(
            [section("slow", 0.1, seconds=30), section("next", 0.1)], checks, budget_s=0.5, write=lambda: None
        )
        assert time.perf_counter() - start < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    assert ran == ["slow"] and "cut short by SIGALRM" in results["slow"]["error"]
    assert results["next"]["skipped"] == "after a cut (SIGALRM)"


@pytest.mark.slow
def test_gpu_checks_killed_after_its_first_section_leave_that_section_written(tmp_path):
    """A call cut short (here: SIGKILL once section 1 is done) still returns what finished: the JSON
    and the markdown, with its summary table, are written after every section."""
    only = ["--only", "table2", "slice"]
    cmd = [sys.executable, "scripts/gpu_checks.py", "--dry-run", *only, "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "gpu_checks.json", time.monotonic() + 600
    try:
        while not (path.exists() and "table2" in json.loads(path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, "section 1 did not finish"
            time.sleep(0.2)
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed while section 2 ran
    results = json.loads(path.read_text())
    assert list(results) == ["machine", "table2"] and "result" in results["table2"]
    report = (tmp_path / "gpu_checks.md").read_text()
    assert "| 64x64 | wan |" in report and "| 1 | table2 | ok |" in report
    assert "| 2 | slice | not reached | - | - |" in report


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
