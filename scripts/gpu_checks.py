"""Every GPU check of magitrain, on one H100/H200, in ONE call of at most 8 minutes:

    scripts/gpu_checks.sh --out outputs/gpu_checks             # --budget-s 480 (the default)
    scripts/gpu_checks.sh --dry-run --out /tmp/gpu_dry         # the same code paths, toy size, CPU

The sections run in priority order (SECTIONS below): the headline figures first, then the rest.

1. `table2`: the Table 2 rows 256p and 1080p with Turbo-VAED, random 15B weights, `compile=blocks`
   (the 1080p SR model with its real local-attention mask), the 1080p row again with a 2-step
   distilled SR stage (`1080p:2`, recipe=sr_dmd2_1080p's student) beside the released 5 UniPC
   steps, and that model's block masks;
2. `slice`: the 15B-wide slice (2 sandwich + 2 shared layers, 256p 5 s, bf16), compiled: forward
   and forward+backward, with MFU;
3. `tests`: every test of the suite marked `gpu` (`pytest -m gpu tests/`: DeepSpeed ZeRO-2/3 and
   bf16 FSDP2 training steps, compiled flex attention and its BlockMask backward, DMD-2's teacher in
   pinned host memory, LoRA and LoRA-DMD peak memory of the full 15B model, codec offloading);
4. `dmd_slice`: three DMD-2 generator steps (two critic updates each) of that slice (student, critic
   and teacher, the teacher a released-layout checkpoint of random weights), FSDP2, bf16,
   activation checkpointing: seconds of the critic and generator phases, the run's peak memory;
5. `plan_vs_gpu`: `python -m magitrain.plan` of that DMD-2 run against the peak it measured (a
   figure, not a pass/fail: issue #18's goal is within 10 %);
6. `tread`: TREAD token routing side by side on a 5-layer 15B-wide slice (sandwich 0, 1, 4;
   layers 1..3 routed at rate 0.5: 3 of 5 layers, the released 24 of 40), compiled, bf16, 256p
   5 s: training-step tokens/s and computed FLOPs with and without routing (goal: >= 1.35x);
7. `training`: a short training run of the slice under FSDP2 and under DeepSpeed ZeRO-3: tokens/s,
   MFU and peak memory from the throughput callback, the FSDP2 run's plan beside its peak;
8. `slice_eager`: the slice of section 2 without compile;
9. `table2_540p`: the 540p row, Turbo-VAED and the full Wan2.2 VAE side by side, compiled;
10. `decode`: a bf16 and a float32 decode of the 256p latent with the full-size video codec;
11. `step_compile`: the 256p distilled base stage of the 15B model with each layer compiled
   (`compile=blocks`) and with the whole denoising step compiled (`compile=step`), side by side:
   seconds, warm-up (compilation) seconds and the graph breaks dynamo reports.

`--budget-s` (default 480) bounds the call: a section whose recorded estimate (ESTIMATE_S, seconds
on one H100 including model builds and compilation; DRY_ESTIMATE_S for the dry run) does not fit
in what is left is skipped, and at the budget the section still running is cut short (SIGALRM;
SIGTERM does the same). OUT/gpu_checks.json and OUT/gpu_checks.md (rows for docs/benchmarks.md,
then one summary table: status, seconds and estimate per section) are written after every
section, so a call cut short still returns what finished. Replace an estimate by the `seconds`
a GPU run recorded. A failing section is recorded with its error and the others still run; the
exit status is 1 if any section failed or was cut short. The dry run uses the tiny presets, tiny
codecs and the `eager` compile backend; ZeRO-3 is built but not run there (DeepSpeed refuses a
CPU), the GPU tests are collected and skipped, and the plan has no measured peak to meet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SLICE = ["--layers", "4", "--sandwich", "0,1", "--gelu", "0"]  # the 15B-wide slice
TREAD_SLICE = ["--layers", "5", "--sandwich", "0,1,4", "--gelu", "0"]  # routes layers 1..3 of 5
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> float:
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)


# ----- 1. Table 2 -----------------------------------------------------------------------------------
TABLE2_ROWS = ("none", "1080p", "1080p:2")  # 1080p:2: the SR stage as a 2-step distilled student


def table2(dry: bool, rows: tuple[str, ...] = TABLE2_ROWS, wan_beside: bool = False) -> dict:
    """Table 2 rows with random 15B weights, compiled; Turbo-VAED only unless `wan_beside` (a 1080p
    Wan2.2 decode takes minutes)."""
    from magitrain.codecs import build_tiny_codecs
    from magitrain.inference.benchmark import random_codecs, run_benchmark

    if dry:  # a 1080p decode takes minutes on a CPU: a 128x128 "SR" row and the real 1080p masks
        dry_rows = tuple(r if r == "none" else "128x128" + "".join(r.partition(":")[1:]) for r in rows)
        rows = run_benchmark("tiny", dry_rows, seconds=0.16, resolution="64x64", codecs=build_tiny_codecs(),
                             device="cpu", repeats=1, warmup=0, wan_beside=wan_beside)  # fmt: skip
    else:
        codecs = random_codecs(torch.bfloat16, decode_tile=512)
        rows = run_benchmark("magihuman_15b", rows, seconds=5.0, resolution="256p", codecs=codecs,
                             device="cuda", repeats=1, warmup=1, compile="blocks",
                             wan_beside=wan_beside)  # fmt: skip
    return {"rows": rows, "sr1080_masks": sr1080_masks()}


def sr1080_masks() -> dict:
    """The 1080p SR model's block masks at the real 5 s shape, built on the CPU (no S x S tensor)."""
    from magitrain.inference import ClipShape
    from magitrain.inference.benchmark import sr_config
    from magitrain.model import SequenceLayout

    config = sr_config("magihuman_15b", "1080p")
    T, H, W = ClipShape.of(5.0, "1080p").latent_size
    layout = SequenceLayout(1, T, H // 2, W // 2, 126, 100)
    start = time.perf_counter()
    local = layout.block_mask(config.frame_window)
    seconds = time.perf_counter() - start
    blocks = float(local.kv_num_blocks.sum() + local.full_kv_num_blocks.sum())
    return {
        "seq_len": layout.seq_len,
        "local_layers": len(config.local_attn_layers),
        "local_block_density": round(blocks / local.kv_num_blocks.shape[-1] ** 2, 3),
        "build_s": round(seconds, 3),
    }


# ----- 2. the slice benchmark -----------------------------------------------------------------------
def slice_benchmark(dry: bool, compiled: bool) -> dict:
    import bench_model

    if dry:
        args = ["--preset", "tiny", "--shape", "64x64x1s", "--steps", "1", "--warmup", "0"]
        args += ["--compile", "--compile-backend", "eager"] if compiled else []
    else:
        args = ["--preset", "magihuman_15b", *SLICE, "--shape", "448x256x5s", "--dtype", "bf16"]
        args += ["--steps", "5", "--warmup", "2", "--peak-tflops", str(peak_tflops())]
        args += ["--compile"] if compiled else []
    return bench_model.benchmark(bench_model.parser().parse_args(args))


def tread_benchmark(dry: bool) -> dict:
    """Section `tread`: bench_model's side-by-side training steps without and with routing."""
    import bench_model

    if dry:
        # eager: the dry run of `slice` covers the compile path, tests/test_tread.py compiled routing
        args = ["--preset", "tiny", "--shape", "64x64x1s", "--steps", "1", "--warmup", "0", "--rounds", "1"]
    else:
        args = ["--preset", "magihuman_15b", *TREAD_SLICE, "--shape", "448x256x5s", "--dtype", "bf16"]
        args += ["--steps", "5", "--warmup", "2", "--rounds", "3", "--compile"]
        args += ["--peak-tflops", str(peak_tflops())]
    args += ["--tread", "0.5", "--tread-layers", "1,3"]
    return bench_model.benchmark(bench_model.parser().parse_args(args))["tread"]


# ----- 3. the GPU tests -----------------------------------------------------------------------------
def gpu_tests(dry: bool) -> dict:
    """Every test of the suite marked `gpu` (on the CPU of the dry run: collected, then skipped)."""
    # one process (-n 0: not pyproject's two xdist workers): the tests share one GPU. Only the files
    # that use the marker are collected (collecting all of tests/ imports every test module).
    marked = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-n", "0", "-q", "-rspfE", "-m", "gpu", *marked]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    if proc.returncode not in (0, 5) or (not dry and "passed" not in tail):
        raise RuntimeError(f"pytest -m gpu {' '.join(marked)}: {tail}\n{proc.stdout[-3000:]}")
    files = sorted(set(re.findall(r"tests/test_\w+\.py", proc.stdout)))  # from the short summary
    return {"summary": tail, "files": files}


# ----- 4. DMD-2 of the slice ---------------------------------------------------------------------------
TTUR = 2  # critic updates per generator step


def dmd_run(dry: bool) -> tuple[list[str], dict]:
    """train.py overrides of the DMD-2 run of the slice (less teacher and data) and its bucket."""
    model, bucket = slice_run(dry)
    return [*model, "recipe=dmd2_distill", "strategy=fsdp2", "module.parallel.activation_checkpointing=true",
            f"module.dmd.ttur={TTUR}"], bucket  # fmt: skip


def dmd_slice(out: Path, dry: bool) -> dict:
    """A few DMD-2 generator steps of the slice (student, critic and teacher all 4 layers, 15B wide),
    FSDP2 world 1, bf16, activation checkpointing: seconds per phase and the run's peak memory."""
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, get_config

    data = out / "data" if (out / "data").is_dir() else training_data(out / "data", dry)
    teacher = out / "dmd_teacher"
    if not (teacher / "config.json").exists():  # a released-layout checkpoint of a random slice
        torch.manual_seed(0)
        if dry:
            config = get_config("tiny")
        else:
            config = get_config("magihuman_15b", num_layers=4, sandwich_layers=(0, 1), gelu7_layers=(0,))
        with torch.device("cpu" if dry else "cuda"):
            net = MagiHumanDiT(config)
        save_official(net, teacher, dtype=torch.bfloat16)
        del net
        torch.cuda.empty_cache()
    overrides, bucket = dmd_run(dry)
    overrides += [f"teacher={teacher}", "trainer.max_steps=3", "trainer.log_every_n_steps=1", buckets(bucket)]
    rows = train_py(overrides, data, out / "dmd_slice")
    phases = [r for r in rows if r.get("perf/critic_phase_s")]
    last = phases[-1]  # step 3: past allocator warm-up
    peaks = [float(r["perf/peak_memory_gib"]) for r in rows if r.get("perf/peak_memory_gib")]
    return {
        "ttur": TTUR,
        "critic_phase_s": float(last["perf/critic_phase_s"]),  # ttur critic updates
        "critic_update_s": float(last["perf/critic_phase_s"]) / TTUR,
        "generator_phase_s": float(last["perf/generator_phase_s"]),
        "peak_memory_gib": max(peaks) if peaks else None,  # of the run (no peak per phase is logged)
    }


# ----- 5. the planner against the measured peak ------------------------------------------------------
def plan_against(overrides: list[str], bucket: dict, measured: float | None) -> dict:
    """The plan (`python -m magitrain.plan OVERRIDES gpus=1 --json`, called in this process) of one
    80 GB GPU at `bucket`'s size vs the peak a run measured (the throughput callback's
    `torch.cuda.max_memory_allocated`; None on the CPU)."""
    from magitrain.plan import plan
    from magitrain.plan.planner import parse_bytes

    result = plan(overrides, 1, parse_bytes("80GB"), bucket).to_json()
    planned = result["total"] / 2**30
    result = {"plan_gib": round(planned, 3), "per_gpu": result["per_gpu"], "peak_phase": result["peak_phase"],
              "measured_gib": measured}  # fmt: skip
    if measured:
        result["plan_over_measured"] = round(planned / measured, 3)
        result["within_10_percent"] = abs(planned / measured - 1) <= 0.10
    return result


def plan_vs_gpu(results: dict, dry: bool) -> dict:
    """The plan of the DMD-2 slice run (section 4) vs the peak that run measured (a figure, not a
    test: issue #18's goal is within 10 %)."""
    overrides, bucket = dmd_run(dry)
    measured = results.get("dmd_slice", {}).get("result", {}).get("peak_memory_gib")
    return plan_against(overrides, bucket, measured)


# ----- 6. training steps under FSDP2 and ZeRO-3 (and the slice's runs of sections 4-5) -------------
def training_data(out: Path, dry: bool) -> Path:
    from magitrain.data.synthetic import make_latent_dataset

    shape, text_dim = ((3, 4, 4), 64) if dry else ((32, 16, 28), 3584)  # 256p 5 s
    make_latent_dataset(out, num_samples=8, per_shard=4, latent_shapes=(shape,), text_dim=text_dim,
                        text_lengths=(80, 120) if not dry else (3, 12))  # fmt: skip
    return out


def slice_run(dry: bool) -> tuple[list[str], dict]:
    """train.py overrides of the 15B-wide slice on one GPU (tiny on the CPU) and its 256p 5 s bucket."""
    if dry:
        return ["model=tiny", "trainer=cpu", "trainer.devices=1"], dict(
            height=64, width=64, frames=9, batch_size=1
        )
    model = [
        "model=magihuman_15b",
        "+model.num_layers=4",
        "+model.sandwich_layers=[0,1]",
        "+model.gelu7_layers=[0]",
        "trainer=gpu",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"callbacks.throughput.peak_tflops={peak_tflops()}",
    ]
    return model, dict(height=256, width=448, frames=125, batch_size=1)


def buckets(bucket: dict) -> str:
    return "data.buckets=[{" + ", ".join(f"{k}: {v}" for k, v in bucket.items()) + "}]"


def train_py(overrides: list[str], data: Path, out: Path, timeout: float = 420) -> list[dict]:
    """Run `train.py OVERRIDES` over the synthetic shards; the rows of its metrics.csv."""
    import csv

    cmd = [
        sys.executable, "train.py", *overrides, "callbacks.progress_bar=null",
        "callbacks.model_checkpoint=null", f"data.shards={data}/*.tar", "data.num_workers=0",
        f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def training_run(strategy: str, data: Path, out: Path, dry: bool) -> dict:
    model, bucket = slice_run(dry)
    ema = ["callbacks.ema=null"] if strategy == "deepspeed_zero3" else []  # the EMA refuses ZeRO-3
    overrides = [*model, f"strategy={strategy}", "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                 buckets(bucket), "module.optim.warmup_steps=1", *ema]  # fmt: skip
    rows = [r for r in train_py(overrides, data, out) if r.get("perf/mfu")]
    last = rows[-1]  # steps 3-4: past compilation and allocator warm-up
    return {k: float(v) for k, v in last.items() if k.startswith("perf/") and v}


def training_steps(out: Path, dry: bool) -> dict:
    data = out / "data" if (out / "data").is_dir() else training_data(out / "data", dry)
    results = {"fsdp2": training_run("fsdp2", data, out / "fsdp2", dry)}
    model, bucket = slice_run(dry)
    measured = results["fsdp2"].get("perf/peak_memory_gib")
    results["fsdp2_plan"] = plan_against(["recipe=base_pretrain", *model, "strategy=fsdp2"], bucket, measured)
    if dry:  # DeepSpeed refuses a CPU: build its strategy only
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import compose_train

        from magitrain.launch import build_strategy

        strategy = build_strategy(compose_train(["strategy=deepspeed_zero3"], out / "zero3").strategy)
        results["deepspeed_zero3"] = {"built": type(strategy).__name__, "run": "needs CUDA"}
    else:
        results["deepspeed_zero3"] = training_run("deepspeed_zero3", data, out / "zero3", dry)
    return results


# ----- 9. codec decode --------------------------------------------------------------------------------
def codec_decode(dry: bool) -> dict:
    from magitrain.codecs import build_tiny_codecs
    from magitrain.inference import ClipShape
    from magitrain.inference.benchmark import random_codecs

    device = "cpu" if dry else "cuda"
    clip = ClipShape.of(0.32 if dry else 5.0, "64x64" if dry else "256p")
    latent = torch.randn(clip.video_latent_shape(), device=device)
    results = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        codecs = build_tiny_codecs() if dry else random_codecs(dtype)
        video = codecs.video.to(device)
        if dry:
            video.to(dtype)
        for _ in range(2):  # the first decode warms kernels up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                video.decode(latent.to(dtype))
            if device == "cuda":
                torch.cuda.synchronize()
            results[name] = round(time.perf_counter() - start, 4)
        del codecs, video
    results["bf16_speedup"] = round(results["fp32"] / results["bf16"], 3)
    return results


# ----- 10. compile=blocks vs compile=step ----------------------------------------------------------
def step_compile(dry: bool) -> dict:
    from torch._dynamo.utils import counters

    from magitrain.codecs import build_tiny_codecs
    from magitrain.inference.benchmark import random_codecs, run_benchmark

    results = {}
    for mode in ("blocks", "step"):
        torch._dynamo.reset()
        counters.clear()
        if dry:
            rows = run_benchmark("tiny", ("none",), seconds=0.16, resolution="64x64",
                                 codecs=build_tiny_codecs(), device="cpu", repeats=1, warmup=1,
                                 compile=mode, compile_backend="eager")  # fmt: skip
        else:
            rows = run_benchmark("magihuman_15b", ("none",), seconds=5.0, resolution="256p",
                                 codecs=random_codecs(torch.bfloat16, video_decoder="wan"), device="cuda",
                                 repeats=2, warmup=1, compile=mode)  # fmt: skip
        row = rows[0]
        results[mode] = {
            "base_s": row["base"],
            "warmup_s": row.get("warmup", {}),
            "peak_gib": row.get("peak_gib", {}),
            "graph_breaks": dict(counters["graph_break"]),
            "unique_graphs": counters["stats"]["unique_graphs"],
        }
    results["step_over_blocks_speedup"] = round(results["blocks"]["base_s"] / results["step"]["base_s"], 3)
    return results


# ----- the sections, in priority order ------------------------------------------------------------
@dataclass(frozen=True)
class Checks:
    out: Path
    dry: bool
    results: dict


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Checks], dict]
    # Recorded estimates of the whole section (model builds, compilation, timed runs), seconds: on one
    # H100 guessed from the report's figures and the sizes (no GPU run yet: replace each by the
    # `seconds` a GPU call records), and for the dry run rough ones of the shared 2-core CPU VM.
    estimate_s: float
    dry_estimate_s: float


SECTIONS = (
    Section("table2", lambda c: table2(c.dry), 320, 75),  # (+50 s, +15 s: the 2-step SR row, guessed)
    Section("slice", lambda c: slice_benchmark(c.dry, compiled=True), 75, 20),
    Section("tests", lambda c: gpu_tests(c.dry), 150, 45),
    Section("dmd_slice", lambda c: dmd_slice(c.out, c.dry), 90, 60),
    Section("plan_vs_gpu", lambda c: plan_vs_gpu(c.results, c.dry), 20, 30),
    Section("tread", lambda c: tread_benchmark(c.dry), 90, 10),
    Section("training", lambda c: training_steps(c.out, c.dry), 150, 60),
    Section("slice_eager", lambda c: slice_benchmark(c.dry, compiled=False), 40, 10),
    Section("table2_540p", lambda c: table2(c.dry, ("540p",), wan_beside=True), 200, 30),
    Section("decode", lambda c: codec_decode(c.dry), 40, 15),
    Section("step_compile", lambda c: step_compile(c.dry), 240, 60),
)


class CutShort(BaseException):
    """The budget ran out (SIGALRM) or the call is being stopped (SIGTERM) inside a section."""


def stop_at_budget(budget_s: float) -> None:
    """Cut the running section short at the budget or on SIGTERM, so the results are still written."""

    def cut(signum, frame):
        raise CutShort(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, cut)
    signal.signal(signal.SIGALRM, cut)
    signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))


def run_sections(sections, checks: Checks, budget_s: float, write: Callable[[], None]) -> None:
    """Run `sections` in order into checks.results, writing after each; skip a section whose estimate
    does not fit in what is left of `budget_s`, and everything after a section that was cut short."""
    start, cut = time.perf_counter(), None
    for sec in sections:
        estimate = sec.dry_estimate_s if checks.dry else sec.estimate_s
        left = budget_s - (time.perf_counter() - start)
        if cut or estimate > left:
            why = f"after a cut ({cut})" if cut else f"estimate {estimate:.0f} s > {max(left, 0):.0f} s left"
            checks.results[sec.name] = {"skipped": why, "estimate_s": estimate}
            write()
            continue
        print(f"== {sec.name} (estimate {estimate:.0f} s, {left:.0f} s left)", flush=True)
        begin = time.perf_counter()
        try:
            record = {"result": sec.run(checks)}
        except CutShort as stop:
            cut = str(stop)
            record = {"error": f"cut short by {cut} (the budget of {budget_s:.0f} s, or a stop)"}
        except Exception as err:  # a section's failure is a result too: record it, run the others
            record = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            print(record["traceback"], flush=True)
        record.update(seconds=round(time.perf_counter() - begin, 1), estimate_s=estimate)
        checks.results[sec.name] = record
        write()


# ----- report ----------------------------------------------------------------------------------------
def status(record: dict | None) -> str:
    if record is None:
        return "not reached"
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    return "FAILED" if "error" in record else "ok"


def summary(results: dict, sections=SECTIONS) -> list[str]:
    lines = ["| # | section | status | seconds | estimate s |", "|---|---|---|---|---|"]
    for i, sec in enumerate(sections, 1):
        record = results.get(sec.name)
        seconds = record.get("seconds", "-") if record else "-"
        estimate = record.get("estimate_s", "-") if record else "-"
        lines.append(f"| {i} | {sec.name} | {status(record)} | {seconds} | {estimate} |")
    return lines


def table2_lines(table: dict) -> list[str]:
    lines = ["| output | decoder | base s | SR s | decode s | total s |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        cells = [r["output"], r["decoder"]] + [
            f"{r[k]:.2f}" if r.get(k) else "-" for k in ("base", "sr", "decode", "total")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: dict, machine: str) -> str:
    lines = [f"GPU checks on {machine}, {time.strftime('%Y-%m-%d')}", ""]
    result = {k: v["result"] for k, v in results.items() if isinstance(v, dict) and "result" in v}
    for name in ("table2", "table2_540p"):
        if name in result:
            lines += table2_lines(result[name])
    slices = {k: result[k] for k in ("slice", "slice_eager") if k in result}
    if slices:
        lines += ["| slice | fwd+bwd s/step | TFLOP/s | MFU |", "|---|---|---|---|"]
        for name, bench in slices.items():
            fb = bench["forward_backward"]
            lines.append(f"| {'compiled' if name == 'slice' else 'eager'} | {fb['s_per_step']} | "
                         f"{fb['tflops']} | {fb['mfu']} |")  # fmt: skip
        lines.append("")
    if "tests" in result:
        lines += [f"pytest -m gpu tests/: {result['tests']['summary']}", ""]
    dmd = result.get("dmd_slice")
    if dmd:
        critic, generator = dmd["critic_phase_s"], dmd["generator_phase_s"]
        lines += [f"DMD-2 slice generator step (ttur {dmd['ttur']}): critic phase {critic:.2f} s "
                  f"({dmd['critic_update_s']:.2f} s per update), generator phase {generator:.2f} s, "
                  f"peak {dmd['peak_memory_gib']} GiB", ""]  # fmt: skip
    planned = result.get("plan_vs_gpu")
    if planned:
        ratio = planned.get("plan_over_measured", "-")
        lines += [f"Planner vs the DMD-2 slice run: plan {planned['plan_gib']} GiB, measured "
                  f"{planned['measured_gib']} GiB, ratio {ratio}", ""]  # fmt: skip
    tread = result.get("tread")
    if tread:
        lines += ["| TREAD slice | tokens/s | computed TFLOP/step | TFLOP/s |", "|---|---|---|---|"]
        for name in ("off", "tread"):
            t = tread[name]
            lines.append(f"| {name} | {t['tokens_per_s']} | {t['computed_tflop_per_step']} | {t['tflops']} |")
        ratios = f"tokens/s x{tread['tokens_per_s_ratio']}, computed FLOPs x{tread['computed_flops_ratio']}"
        lines += [f"TREAD rate {tread['rate']}, layers {tread['layers']}: {ratios}", ""]
    train = result.get("training")
    if train:
        lines += ["| strategy | tokens/s | MFU | peak GiB | plan GiB |", "|---|---|---|---|---|"]
        for name in ("fsdp2", "deepspeed_zero3"):
            t = train[name]
            plan = train["fsdp2_plan"]["plan_gib"] if name == "fsdp2" else "-"
            lines.append(f"| {name} | {t.get('perf/tokens_per_s', '-')} | {t.get('perf/mfu', '-')} | "
                         f"{t.get('perf/peak_memory_gib', '-')} | {plan} |")  # fmt: skip
        lines.append("")
    decode = result.get("decode")
    if decode:
        lines += [f"Video decode: bf16 {decode['bf16']} s, fp32 {decode['fp32']} s", ""]
    steps = result.get("step_compile")
    if steps:
        blocks, step = steps["blocks"], steps["step"]
        lines += [f"256p base stage: compile=blocks {blocks['base_s']:.2f} s, compile=step "
                  f"{step['base_s']:.2f} s (x{steps['step_over_blocks_speedup']}); warm-up "
                  f"{blocks['warmup_s']} / {step['warmup_s']}; graph breaks of the step: "
                  f"{step['graph_breaks'] or 'none'}", ""]  # fmt: skip
    return "\n".join(lines + summary(results)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_checks")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: the same code paths")
    p.add_argument("--budget-s", type=float, default=480.0, help="the call's seconds (default 480: 8 min)")
    p.add_argument("--only", nargs="*", help=f"sections ({' '.join(s.name for s in SECTIONS)})")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs a CUDA device (or --dry-run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if not dry else f"CPU x{torch.get_num_threads()} (dry run)"
    results: dict = {"machine": {"device": machine, "torch": torch.__version__, "dry_run": dry,
                                 "budget_s": args.budget_s}}  # fmt: skip
    if args.only and (out / "gpu_checks.json").exists():  # a later call adds its sections to the first's
        results = json.loads((out / "gpu_checks.json").read_text()) | results

    def write() -> None:  # after every section: a call cut short still returns what finished
        (out / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_checks.md").write_text(markdown(results, machine))

    sections = [s for s in SECTIONS if not args.only or s.name in args.only]
    stop_at_budget(args.budget_s)
    try:
        run_sections(sections, Checks(out, dry, results), args.budget_s, write)
    except CutShort:  # between two sections: what finished is written; write once more, whole
        write()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(markdown(results, machine))
    return 1 if any("error" in v for k, v in results.items() if k != "machine") else 0


if __name__ == "__main__":
    sys.exit(main())
