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

    python scripts/quality_toy.py --a2v [--classes K] [--seed S] [--a2v-steps N] [--json out.json]

Audio-driven video (issue 24): the same toy with ONE prompt for every class, so only the audio says
which class a clip is. `train.py recipe=base_pretrain module.flow.conditioning.p_a2v=P` trains each
row below (exported `--ema`); each generates video for held-out clean audio latents (class_sample
of the audio prototypes, a stream of their own from S + 10000), the audio held fixed at every step
of an in-script Euler sampler over the released 32-step grid without CFG (`sample_a2v`: the toy's
audio is latents, and `infer.py audio=` takes a sound file). a2v_accuracy: the share of videos
whose nearest video prototype is the given audio's class (chance 1/K). Rows: untrained; joint
(p_a2v = 0: the usual joint training, driven by clean audio only at sampling); a2v (p_a2v = 1);
a2v_unpaired (p_a2v = 1 on a toy whose audio is of a random class: the negative control). Goals:
a2v >= 0.9; a2v_unpaired below 0.5 + 1/(2K).

    python scripts/quality_toy.py --voice [--classes K] [--seed S] [--voice-steps N] [--json out.json]

Voice references (issue 27): K speakers (`make_voice_latent_dataset`), ONE prompt, each clip's audio
latents its speaker's voice (a per-channel pattern) plus per-token noise, clips of 12 latent frames
so that `data.voice_reference` (source same_clip) finds the clip's own voice past the 3-frame cut.
`train.py recipe=base_pretrain data.voice_reference.p=P` trains each row (exported `--ema`): voice
(p = 1, p_drop 0.1); voice_unpaired (p = 1 on a toy whose clips change voice past the trained cut,
so every reference names another speaker: the negative control); no_reference (p = 0: never shown
a reference, sampled with one: what the base model makes of reference tokens unasked; no goal).
Each generates audio for
held-out references (`voice_references`: 1.2 s fresh samples of each voice, a stream of their own
from S + 10000), the reference clean at every step of an in-script Euler sampler over the released
32-step grid without CFG (`sample_voice`). voice_accuracy: the share of generated audio whose
nearest voice is the reference's (chance 1/K). Goals: voice >= 0.9; untrained and voice_unpaired
below 0.5 + 1/(2K).
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


def tiny_text_encoder():
    """The text encoder of `codecs=tiny` (what train.py and infer.py use here)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(REPO / "conf" / "codecs" / "tiny.yaml")).text


def write_toy(work: Path, prompts: list[str], seed: int, data: str = "data", **options) -> dict:
    """The toy's shards in work/DATA (`make_class_latent_dataset` OPTIONS); its prototypes."""
    from magitrain.data.synthetic import make_class_latent_dataset

    encoder = tiny_text_encoder()
    return make_class_latent_dataset(work / data, prompts, encoder, latent_shape=LATENT, seed=seed, **options)


def write_untrained(work: Path, seed: int) -> Path:
    """The network a base run with `seed=S` starts from (train.py seeds, then builds it: checked
    equal to a run's step-0 weights), in the released layout."""
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, get_config

    torch.manual_seed(seed)
    return save_official(MagiHumanDiT(get_config("tiny")), work / "untrained")


def train(work: Path, name: str, overrides: list[str], export: list[str]) -> float:
    """`train.py OVERRIDES hydra.run.dir=work/NAME`, then its export to work/NAME/export: seconds."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)  # each run anew (train.py refuses an earlier run's folder)
    seconds = command(
        [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run}"],
        work / f"{name}_train.log",
    )
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


def run(
    work: Path,
    classes: int,
    seed: int,
    base: list[str],
    dmd: list[str] | None,
    eval_seeds: int,
    rows: tuple[str, ...] = tuple(ROWS),
) -> dict:
    """The toy, the networks the `rows` need, and the rows' scores."""
    from magitrain.data.synthetic import class_prompts
    from magitrain.data.toy_scores import class_scores, projections, sw_distance

    start = time.perf_counter()
    prompts = class_prompts(classes)
    protos = write_toy(work, prompts, seed)
    common = ["experiment=cpu_demo", f"data.shards={work}/data/*.tar", f"seed={seed}"]
    needed = {ROWS[row][0] for row in rows}
    networks, timings = {"untrained": write_untrained(work, seed)}, {}
    if needed & {"base", "dmd2"}:
        timings["base_s"] = train(work, "base", [*common, "recipe=base_pretrain", *base], ["--ema"])
        networks["base"] = work / "base" / "export"
    if "dmd2" in needed:
        teacher = [*common, "recipe=dmd2_distill", f"teacher={networks['base']}", *dmd]
        timings["dmd2_s"] = train(work, "dmd2", teacher, [])
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


# ----- audio-driven video: one prompt for every class, the class in the audio ---------------------
A2V_PROMPT = "A shape makes a sound"
A2V_ROWS = {"joint": (0.0, True), "a2v": (1.0, True), "a2v_unpaired": (1.0, False)}  # (p_a2v, paired)
A2V_STEPS = 300


def sample_a2v(network, audio, text, steps: int = 32):
    """Video latents [B, 48, *LATENT] generated for the clean audio latents `audio` [B, N, 64],
    which enter every step unchanged: Euler steps of the velocity over `flow_grid(steps)` (the
    released grid, shift 5) from seeded noise, no CFG; `text` [1, L, C] is every sample's prompt."""
    from magitrain.flow import flow_grid

    B = audio.shape[0]
    video = torch.randn(B, 48, *LATENT, generator=torch.Generator().manual_seed(1000))
    sigmas = flow_grid(steps)[1].tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v_video, _ = network(video, audio, text.expand(B, -1, -1))
            video = video + (s_next - s) * v_video
    return video


def a2v_accuracy(video, labels, protos: dict) -> float:
    """The share of generated videos whose nearest video prototype is their audio's class."""
    from magitrain.data.toy_scores import nearest

    return (nearest(protos["video"], video)[0] == labels).float().mean().item()


def held_out_audio(protos: dict, classes: int, eval_seeds: int, seed: int):
    """(labels, audio latents): `eval_seeds` fresh audio samples per class, from S + 10000."""
    from magitrain.data.synthetic import class_sample

    labels = torch.arange(classes).repeat_interleave(eval_seeds)
    gen = torch.Generator().manual_seed(seed + 10_000)
    return labels, torch.stack([class_sample(protos, int(c), SPREAD, gen)["audio"] for c in labels])


def run_a2v(work: Path, classes: int, seed: int, steps: int, eval_seeds: int) -> dict:
    """The one-prompt toy (paired and unpaired), a base run per A2V_ROWS row, and every row's score."""
    from magitrain.checkpoint import load_official
    from magitrain.model import MagiHumanDiT, get_config

    start, prompts = time.perf_counter(), [A2V_PROMPT] * classes
    protos = write_toy(work, prompts, seed)
    write_toy(work, prompts, seed, data="data_unpaired", pair_audio=False)
    text = tiny_text_encoder().encode([A2V_PROMPT])[0].bfloat16().float()  # (stored bf16 in the shards)
    labels, audio = held_out_audio(protos, classes, eval_seeds, seed)
    networks, timings = {"untrained": write_untrained(work, seed)}, {}
    for row, (p, paired) in A2V_ROWS.items():
        data = f"{work}/{'data' if paired else 'data_unpaired'}/*.tar"
        overrides = ["experiment=cpu_demo", f"data.shards={data}", f"seed={seed}", "recipe=base_pretrain",
                     f"trainer.max_steps={steps}", f"module.flow.conditioning.p_a2v={p}", *BASE]  # fmt: skip
        timings[f"{row}_s"] = train(work, row, overrides, ["--ema"])
        networks[row] = work / row / "export"
    scores = {}
    for row, path in networks.items():
        network = load_official(MagiHumanDiT(get_config("tiny")), path).eval()
        scores[row] = {"a2v_accuracy": a2v_accuracy(sample_a2v(network, audio, text), labels, protos)}
    timings["total_s"] = time.perf_counter() - start
    return {"rows": scores, "goals": a2v_goals(scores, classes), "timings": timings}


# ----- voices: one prompt for every speaker, the voice in the reference ----------------------------
VOICE_PROMPT = "A person speaks"
VOICE_CLIP = (12, 2, 4)  # clips of 12 latent frames (45 audio latents) under the 3-frame bucket
VOICE_CONTENT = 0.5  # the per-token "what is said" noise around each voice
VOICE_STEPS = 300
# row: (data.voice_reference.p, references of the clip's own voice)
VOICE_ROWS = {"voice": (1.0, True), "voice_unpaired": (1.0, False), "no_reference": (0.0, True)}
# references of 1 to 1.44 s: the 36 latents of the clip's own voice past the 9 it trains on
VOICE_DATA = ["data.voice_reference.p_drop=0.1", "data.voice_reference.max_seconds=1.44"]


def voice_references(voices, speakers: int, eval_seeds: int, seed: int):
    """(speakers [B], held-out references [B, 30, 64]): `eval_seeds` fresh 1.2 s references per
    speaker, from a noise stream of their own (S + 10000)."""
    from magitrain.data.synthetic import voice_sample

    labels = torch.arange(speakers).repeat_interleave(eval_seeds)
    gen = torch.Generator().manual_seed(seed + 10_000)
    return labels, torch.stack([voice_sample(voices, int(k), 30, VOICE_CONTENT, gen) for k in labels])


def sample_voice(network, references, text, steps: int = 32):
    """Audio latents [B, 9, 64] generated with the voice references [B, R, 64] (clean at every step):
    Euler steps of the velocity over `flow_grid(steps)` from seeded noise, no CFG (voice_scale 1)."""
    from magitrain.flow import flow_grid

    B = references.shape[0]
    gen = torch.Generator().manual_seed(1000)
    video, audio = (
        torch.randn(B, 48, *LATENT, generator=gen),
        torch.randn(B, 4 * (LATENT[0] - 1) + 1, 64, generator=gen),
    )
    sigmas = flow_grid(steps)[1].tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v_video, v_audio = network(video, audio, text.expand(B, -1, -1), ref_audio=references)
            video, audio = video + (s_next - s) * v_video, audio + (s_next - s) * v_audio
    return audio


def run_voice(work: Path, speakers: int, seed: int, steps: int, eval_seeds: int, train_py=None) -> dict:
    """The voice toy, a base run per VOICE_ROWS row (train.py, exported --ema), and every row's
    voice_accuracy on held-out references (the untrained network's too). `train_py`: as `run`."""
    from magitrain.checkpoint import load_official
    from magitrain.data.synthetic import make_voice_latent_dataset
    from magitrain.data.toy_scores import voice_accuracy
    from magitrain.model import MagiHumanDiT, get_config

    start = time.perf_counter()
    encoder = tiny_text_encoder()
    for data, paired in (("voice_data", True), ("voice_data_unpaired", False)):
        voices = make_voice_latent_dataset(
            work / data, VOICE_PROMPT, encoder, speakers, latent_shape=VOICE_CLIP, content=VOICE_CONTENT,
            seed=seed, pair_reference=paired,
        )  # fmt: skip
    text = encoder.encode([VOICE_PROMPT])[0].bfloat16().float()  # (stored bf16 in the shards)
    labels, references = voice_references(voices, speakers, eval_seeds, seed)
    networks, timings = {"untrained": write_untrained(work, seed)}, {}
    for row, (p, paired) in VOICE_ROWS.items():
        data = f"{work}/{'voice_data' if paired else 'voice_data_unpaired'}/*.tar"
        overrides = ["experiment=cpu_demo", f"data.shards={data}", f"seed={seed}",
                     "recipe=base_pretrain", f"trainer.max_steps={steps}", f"data.voice_reference.p={p}",
                     *VOICE_DATA, *BASE]  # fmt: skip
        train_cmd = train_py or [sys.executable, str(REPO / "train.py")]
        timings[f"{row}_s"] = train(work, row, overrides, ["--ema"], train_cmd)
        networks[row] = work / row / "export"
    scores = {}
    for row, path in networks.items():
        network = load_official(MagiHumanDiT(get_config("tiny")), path).eval()
        audio = sample_voice(network, references, text)
        scores[row] = {"voice_accuracy": voice_accuracy(audio, labels, voices)}
    timings["total_s"] = time.perf_counter() - start
    return {"rows": scores, "goals": voice_goals(scores, speakers), "timings": timings}


def voice_goals(rows: dict, speakers: int) -> dict[str, bool]:
    near_chance = 0.5 + 0.5 / speakers
    return {
        "voice voice_accuracy >= 0.9": rows["voice"]["voice_accuracy"] >= 0.9,
        "untrained near chance": rows["untrained"]["voice_accuracy"] < near_chance,
        "voice_unpaired near chance": rows["voice_unpaired"]["voice_accuracy"] < near_chance,
    }


def a2v_goals(rows: dict, classes: int) -> dict[str, bool]:
    return {
        "a2v a2v_accuracy >= 0.9": rows["a2v"]["a2v_accuracy"] >= 0.9,
        "a2v_unpaired near chance": rows["a2v_unpaired"]["a2v_accuracy"] < 0.5 + 0.5 / classes,
    }


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
    metrics = list(next(iter(rows.values())))
    lines = ["| row | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [
        f"| {name} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |" for name, row in rows.items()
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
    parser.add_argument("--a2v", action="store_true", help="the audio-driven toy instead (one prompt)")
    parser.add_argument("--a2v-steps", type=int, default=A2V_STEPS, help="base steps of each a2v row")
    parser.add_argument("--voice", action="store_true", help="the voice-reference toy instead (one prompt)")
    parser.add_argument("--voice-steps", type=int, default=VOICE_STEPS, help="base steps of each voice row")
    args = parser.parse_args(argv)
    base = [f"trainer.max_steps={args.base_steps}", *BASE]
    dmd = [f"trainer.max_steps={args.dmd_steps}"]
    rows = tuple(ROWS) if args.dmd_steps else tuple(r for r in ROWS if ROWS[r][0] != "dmd2")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if args.a2v:
            result = run_a2v(work, args.classes, args.seed, args.a2v_steps, args.eval_seeds)
        elif args.voice:
            result = run_voice(work, args.classes, args.seed, args.voice_steps, args.eval_seeds)
        else:
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
