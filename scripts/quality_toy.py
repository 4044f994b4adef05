"""Proof that the recipes learn: a learnable audio+video toy, end to end through the real CLIs.

    python scripts/quality_toy.py [--classes K] [--seed S] [--json out.json] [--work DIR]

The toy (`magitrain.data.synthetic.make_class_latent_dataset`): K classes named by the prompts of
`class_prompts(K)` ("A red circle hums softly", ...), each a video-latent prototype [48, 3, 2, 4]
and a paired audio-latent prototype [9, 64] (standard normal, from S), samples = prototype + 0.1
noise, written as real latent shards with the tiny text encoder's embeddings of the prompts. Then,
each a subprocess, as a user types them (`experiment=cpu_demo`: the tiny model and codecs on CPU):
  1. `train.py recipe=base_pretrain` and `python -m magitrain.export ... --ema` (the base),
  2. `train.py recipe=dmd2_distill teacher=<the exported base>` and its export (the 8-step student),
  3. `infer.py ... prompts=FILE latents_out=... decode=false` for every row below, on held-out noise
     seeds (every class prompt x --eval-seeds seeds from 1000 on),
and the latents are scored (`magitrain.data.toy_scores`) against the prototypes and as many
held-out data samples (a noise stream of its own, from S + 10000): class_accuracy, pairing_accuracy,
sw_distance (per-class sliced Wasserstein-2 over 256 unit directions drawn from S, averaged).
Rows: untrained (the network the base run starts from: the tiny model initialised with seed S,
sampled as base_32_cfg), base_32_cfg (32 UniPC steps with CFG), base_8 (the base, 8 UniPC steps with
CFG: not distilled), dmd2_8 (the student, 8 distilled steps). Goals: dmd2_8 within 5 points of
base_32_cfg on both accuracies (or above) and at most 1.5x its sw_distance; the base far above the
untrained network (its class_accuracy at least half-way from the untrained's to 1). `--json`:
{"rows": {ROW: {"class_accuracy", "pairing_accuracy", "sw_distance"}}, "rms_distance": {ROW: {"video",
"audio"}} (to the prompt's prototypes), "goals": {GOAL: met}, "timings": {...}, "command": ...}; the
exit status is 1 when a goal is missed. Subprocesses run with one torch thread unless OMP_NUM_THREADS
says otherwise. Figures: docs/benchmarks.md, "A/V quality toy".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SECONDS, RESOLUTION, LATENT = 0.32, "64x32", (3, 2, 4)  # the cpu_demo bucket: 9 frames, latent 3 x 2 x 4
SPREAD = 0.1
ROWS = {  # row: (network, infer.py sampling keys)
    "untrained": ("untrained", ["steps=32", "sampler=base"]),
    "base_32_cfg": ("base", ["steps=32", "sampler=base"]),
    "base_8": ("base", ["steps=8", "sampler=base"]),
    "dmd2_8": ("dmd2", ["steps=8", "sampler=distilled"]),
}
METRICS = ("class_accuracy", "pairing_accuracy", "sw_distance")
# the settings of the figures in docs/benchmarks.md: the base's batch and rate on top of cpu_demo's;
# the student at the demo's DMD-2 rates (conf/experiment_recipe/cpu_demo/dmd2_distill.yaml)
BASE_STEPS, DMD_STEPS, EVAL_SEEDS = 1000, 30, 8
BASE = ["data.buckets=[{height: 32, width: 64, frames: 9, batch_size: 8}]", "module.optim.lr=3e-3"]


def command(args: list[str], log: Path) -> float:
    """Run `args` (stdout and stderr to `log`); its seconds, or the log's tail in the error."""
    start = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", **os.environ}  # one thread: the toy's ops are too small to split
    with open(log, "w") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({done.returncode}), {log}:\n{tail}")
    return time.perf_counter() - start


def write_toy(work: Path, classes: int, seed: int) -> tuple[list[str], dict]:
    """The toy's shards in work/data (with the codecs of `codecs=tiny`); its prompts and prototypes."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from magitrain.data.synthetic import class_prompts, make_class_latent_dataset

    codecs = instantiate(OmegaConf.load(REPO / "conf" / "codecs" / "tiny.yaml"))
    prompts = class_prompts(classes)
    protos = make_class_latent_dataset(work / "data", prompts, codecs.text, latent_shape=LATENT, seed=seed)
    return prompts, protos


def write_untrained(work: Path, seed: int) -> Path:
    """The network a base run with `seed=S` starts from (train.py seeds, then builds it: checked
    equal to a run's step-0 weights), in the released layout."""
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, get_config

    torch.manual_seed(seed)
    return save_official(MagiHumanDiT(get_config("tiny")), work / "untrained")


def train(work: Path, name: str, overrides: list[str], export: list[str], train_py: list[str]) -> float:
    """`train.py OVERRIDES hydra.run.dir=work/NAME`, then its export to work/NAME/export: seconds."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)  # each run anew (train.py refuses an earlier run's folder)
    seconds = command([*train_py, *overrides, f"hydra.run.dir={run}"], work / f"{name}_train.log")
    args = [
        sys.executable,
        "-m",
        "magitrain.export",
        f"{run}/checkpoints/last.ckpt",
        f"{run}/export",
        *export,
    ]
    return seconds + command(args, work / f"{name}_export.log")


def sample(work: Path, row: str, ckpt: Path, keys: list[str], jobs: Path, count: int) -> dict:
    """`infer.py` on the held-out jobs with latents only: {"video": [B, ...], "audio": [B, ...]}."""
    from safetensors.torch import load_file

    out = work / "samples" / row
    args = [sys.executable, str(REPO / "infer.py"), f"ckpt={ckpt}", "model=tiny", "codecs=tiny",
            f"seconds={SECONDS}", f"resolution={RESOLUTION}", *keys, f"prompts={jobs}", "decode=false",
            f"latents_out={out}/latents.safetensors", f"out={out}/clip.mp4"]  # fmt: skip
    command(args, work / f"infer_{row}.log")
    files = [load_file(out / f"latents_{i:03d}.safetensors") for i in range(count)]
    return {m: torch.stack([f[m] for f in files]) for m in ("video", "audio")}


def held_out(protos: dict, classes: torch.Tensor, seed: int) -> dict:
    """As many fresh data samples as generated ones, class by class, from a noise stream of their own."""
    from magitrain.data.synthetic import class_sample

    gen = torch.Generator().manual_seed(seed + 10_000)
    draws = [class_sample(protos, int(c), SPREAD, gen) for c in classes]
    return {m: torch.stack([d[m] for d in draws]) for m in protos}


def run(work: Path, classes: int, seed: int, base: list[str], dmd: list[str] | None, eval_seeds: int,
        rows: tuple[str, ...] = tuple(ROWS), train_py: list[str] | None = None) -> dict:  # fmt: skip
    """The toy, the networks the `rows` need, and the rows' scores. `train_py`: the command that
    runs train.py (a test runs a broken loss through it)."""
    from magitrain.data.toy_scores import class_scores, projections, sw_distance

    train_py = train_py or [sys.executable, str(REPO / "train.py")]
    start = time.perf_counter()
    prompts, protos = write_toy(work, classes, seed)
    common = ["experiment=cpu_demo", f"data.shards={work}/data/*.tar", f"seed={seed}"]
    needed = {ROWS[row][0] for row in rows}
    networks, timings = {"untrained": write_untrained(work, seed)}, {}
    if needed & {"base", "dmd2"}:
        timings["base_s"] = train(work, "base", [*common, "recipe=base_pretrain", *base], ["--ema"], train_py)
        networks["base"] = work / "base" / "export"
    if "dmd2" in needed:
        teacher = [*common, "recipe=dmd2_distill", f"teacher={networks['base']}", *dmd]
        timings["dmd2_s"] = train(work, "dmd2", teacher, [], train_py)
        networks["dmd2"] = work / "dmd2" / "export"
    labels = torch.arange(classes).repeat_interleave(eval_seeds)
    jobs = work / "eval.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": prompts[c], "seed": 1000 + i % eval_seeds}) + "\n"
                            for i, c in enumerate(labels.tolist())))  # fmt: skip
    data = held_out(protos, labels, seed)
    directions = projections(sum(v[0].numel() for v in protos.values()), 256, seed)
    scores, distances, sample_start = {}, {}, time.perf_counter()
    for row in rows:
        network, keys = ROWS[row]
        latents = sample(work, row, networks[network], keys, jobs, len(labels))
        found = class_scores(latents["video"], latents["audio"], labels, protos)
        found["sw_distance"] = sw_distance(latents, data, labels, directions)
        scores[row] = {m: found[m] for m in METRICS}
        distances[row] = {m: found[f"{m}_distance"] for m in ("video", "audio")}
    timings |= {"sample_s": time.perf_counter() - sample_start, "total_s": time.perf_counter() - start}
    return {"rows": scores, "rms_distance": distances, "goals": goals(scores), "timings": timings}


def goals(rows: dict) -> dict[str, bool]:
    """The issue's goals on the rows there are."""
    out = {}
    if not {"base_32_cfg", "untrained"} <= set(rows):
        return out
    base, untrained = rows["base_32_cfg"], rows["untrained"]
    halfway = (1 + untrained["class_accuracy"]) / 2
    out["base_32_cfg class_accuracy half-way from the untrained's to 1"] = base["class_accuracy"] >= halfway
    if "dmd2_8" in rows:
        student = rows["dmd2_8"]
        for key in ("class_accuracy", "pairing_accuracy"):
            out[f"dmd2_8 {key} within 0.05 of base_32_cfg (or above)"] = student[key] >= base[key] - 0.05
        out["dmd2_8 sw_distance <= 1.5x base_32_cfg's"] = student["sw_distance"] <= 1.5 * base["sw_distance"]
    return out


def table(rows: dict) -> str:
    lines = ["| row | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [
        f"| {name} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |" for name, row in rows.items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=4, help="K: classes (prompts) of the toy")
    parser.add_argument("--seed", type=int, default=0, help="prototypes, data, initialisation, projections")
    parser.add_argument("--json", type=Path, help='write {"rows": {ROW: {METRIC: ...}}, "goals": ...} here')
    parser.add_argument(
        "--work", type=Path, help="keep the data, runs and samples here (default: a temp dir)"
    )
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--dmd-steps", type=int, default=DMD_STEPS, help="0: no student (no dmd2_8 row)")
    parser.add_argument("--eval-seeds", type=int, default=EVAL_SEEDS, help="held-out noise seeds per class")
    args = parser.parse_args(argv)
    base = [f"trainer.max_steps={args.base_steps}", *BASE]
    dmd = [f"trainer.max_steps={args.dmd_steps}"]
    rows = tuple(ROWS) if args.dmd_steps else tuple(r for r in ROWS if ROWS[r][0] != "dmd2")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = run(work, args.classes, args.seed, base, dmd, args.eval_seeds, rows)
    result["command"] = " ".join(
        ["python scripts/quality_toy.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(table(result["rows"]))
    for goal, met in result["goals"].items():
        print(f"{'met' if met else 'MISSED'}: {goal}")
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
