"""The README's CPU demo and its DMD-2 command, run as written on a learnable toy, scored against the data.

The toy (`magitrain.data.synthetic.make_class_latent_dataset`): four latent classes named by their
prompts, each a paired video and audio prototype, written where the demo's shards go
(`$MAGITRAIN_ROOT/demo_data/latent`). Then, with `MAGITRAIN_ROOT=OUT`:
  1. the base: `scripts/cpu_demo.sh`'s train and export lines (`experiment=cpu_demo`, `--ema`),
  2. the student: the README's DMD-2 train and export lines, read from README.md, with only
     `trainer.max_steps` changed when `--dmd-steps` is given,
and both networks are scored through `MagiHumanPipeline.generate_latents` for every class prompt
and a few seeds (the base: 32 UniPC steps with CFG, the student: 8 distilled steps): class accuracy
(the nearest video prototype is the prompt's), audio-video pairing (the nearest audio prototype is
the video's class) and the per-element RMS distance to the prompt's prototypes. Each run is composed
from conf/ as `train.py` composes it and runs in this process (one interpreter start).

    python scripts/dmd_toy.py OUT [--base-steps 600] [--dmd-steps N] [--set module.critic_optim.lr=4e-7]

docs/benchmarks.md ("DMD-2 demo on a learnable toy") has the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import torch

from magitrain.data.synthetic import class_prompts

REPO = Path(__file__).resolve().parents[1]
PROMPTS = class_prompts(4)  # "A red circle hums softly", "A blue square beeps twice", ...
SECONDS, RESOLUTION = 0.32, "64x32"  # the demo's bucket: 9 frames at 32x64, latent 3 x 2 x 4


def tiny_codecs():
    """The codecs of `codecs=tiny` (conf/codecs/tiny.yaml), which `experiment=cpu_demo` selects."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(REPO / "conf" / "codecs" / "tiny.yaml"))


def readme_dmd2_lines() -> tuple[list[str], list[str]]:
    """The README's DMD-2 train overrides and export arguments (the two lines after `python`)."""
    lines = (REPO / "README.md").read_text().splitlines()
    train = next(
        line for line in lines if line.startswith("python train.py") and "recipe=dmd2_distill" in line
    )
    export = lines[lines.index(train) + 1]
    if not export.startswith("python -m magitrain.export"):
        raise ValueError(f"README.md: the line after the DMD-2 command is not its export: {export!r}")
    return shlex.split(train, comments=True)[2:], shlex.split(export, comments=True)[3:]


def run_train(overrides: list[str]) -> None:
    """`python train.py OVERRIDES`, in this process; `hydra.run.dir=D` becomes the run directory."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from magitrain.launch import train

    output_dir = run_dir(overrides)
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, "callbacks.progress_bar=null", f"paths.output_dir={output_dir}"]
        )
    train(cfg)


def run_dir(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir="))


def run_export(args: list[str]) -> None:
    """`python -m magitrain.export CKPT OUT [--ema] ...`, in this process."""
    from magitrain.export import main

    main(args)


def with_steps(overrides: list[str], steps: int | None) -> list[str]:
    if steps is None:
        return overrides
    return [o for o in overrides if not o.startswith("trainer.max_steps=")] + [f"trainer.max_steps={steps}"]


@torch.no_grad()
def score(export_dir: Path, codecs, prototypes: dict, steps: int, seeds: int) -> dict[str, float]:
    """`toy_scores.class_scores` (class accuracy, audio-video pairing, RMS distances to the prompt's
    prototypes) of the network in `export_dir`, sampled with `steps` (8: distilled, 32: base with CFG)."""
    from magitrain.checkpoint import load_official
    from magitrain.data.toy_scores import class_scores
    from magitrain.inference import MagiHumanPipeline
    from magitrain.model import MagiHumanDiT, tiny

    network = load_official(MagiHumanDiT(tiny()), export_dir).eval()
    pipe = MagiHumanPipeline(network, codecs, device="cpu")
    latents = [
        pipe.generate_latents(prompt, seconds=SECONDS, resolution=RESOLUTION, steps=steps, seed=seed)[0]
        for prompt in PROMPTS
        for seed in range(seeds)
    ]
    video, audio = (torch.cat([x[m] for x in latents]) for m in (0, 1))
    return class_scores(video, audio, torch.arange(len(PROMPTS)).repeat_interleave(seeds), prototypes)


def closer_or_equal(student: dict, teacher: dict) -> list[str]:
    """What the student does worse than its teacher (empty: at least as close to the data)."""
    worse = [k for k in ("class_accuracy", "pairing_accuracy") if student[k] < teacher[k]]
    return worse + [k for k in ("video_distance", "audio_distance") if student[k] > teacher[k]]


def signals(run: str) -> dict[str, list[float]]:
    """The DMD-2 run's divergence signals from its metrics.csv: each one's first and last value."""
    with open(Path(run) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = ("train/update_norm_student", "train/update_norm_critic", "train/generator_teacher_gap_video")
    logged = {k: [float(r[k]) for r in rows if r.get(k)] for k in keys}
    return {k: [v[0], v[-1]] for k, v in logged.items() if v}


def run(out: Path, base_steps: int, dmd_steps: int | None, extra: list[str], seeds: int) -> dict:
    """Toy, base, student, scores; the README's paths are relative to `out` (the working directory)."""
    from magitrain.data.synthetic import make_class_latent_dataset

    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    os.environ["MAGITRAIN_ROOT"] = str(out)
    codecs = tiny_codecs()
    prototypes = make_class_latent_dataset(out / "demo_data" / "latent", list(PROMPTS), codecs.text)
    timings = {}
    start = time.perf_counter()
    if not (out / "outputs/cpu_demo/export").is_dir():  # (a rerun into OUT keeps its base)
        run_train(
            ["experiment=cpu_demo", f"trainer.max_steps={base_steps}", "hydra.run.dir=outputs/cpu_demo"]
        )
        run_export(["outputs/cpu_demo/checkpoints/last.ckpt", "outputs/cpu_demo/export", "--ema"])
    timings["base_s"] = time.perf_counter() - start
    train, export = readme_dmd2_lines()
    shutil.rmtree(run_dir(train), ignore_errors=True)  # the student's run: each run anew
    start = time.perf_counter()
    run_train(with_steps(train, dmd_steps) + list(extra))
    run_export(export)
    timings["dmd2_s"] = time.perf_counter() - start
    first_last = signals(run_dir(train))
    start = time.perf_counter()
    results = {
        "teacher": score(out / "outputs/cpu_demo/export", codecs, prototypes, 32, seeds),
        "student": score(Path(export[1]).resolve(), codecs, prototypes, 8, seeds),
    }
    timings["score_s"] = time.perf_counter() - start
    return results | {
        "signals_first_last": first_last,
        "timings": timings,
        "dmd2_overrides": with_steps(train, dmd_steps) + list(extra),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="an empty folder: the toy's demo_data/ and outputs/ go here")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--dmd-steps", type=int, default=None, help="default: the README's trainer.max_steps")
    parser.add_argument("--set", action="append", default=[], help="one more override of the DMD-2 run")
    parser.add_argument("--seeds", type=int, default=4, help="samples per class prompt")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args.out.resolve(), args.base_steps, args.dmd_steps, args.set, args.seeds)
    print(json.dumps(results, indent=2))
    worse = closer_or_equal(results["student"], results["teacher"])
    print("student at least as close to the data as its teacher" if not worse else f"student worse: {worse}")


if __name__ == "__main__":
    main()
