"""Preemption on a real Slurm: slurm/train.sbatch is submitted to a one-node cluster on this host
(scripts/slurm_local_cluster.sh), gets SIGUSR1 mid-training, requeues itself, resumes, and ends
exactly where an uninterrupted run ends.

Needs root and Debian's slurm-wlm + munge (.ci/run installs them). Skipped with a message where
they are missing, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train

from magitrain.launch import train

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_local_cluster.sh"
TEMPLATE = REPO / "slurm" / "train.sbatch"
NEEDED = ("sbatch", "scontrol", "scancel", "squeue", "slurmctld", "slurmd", "munged")


@dataclass
class Slurm:
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str) -> str:
        return subprocess.run(
            cmd, env=self.env, check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        fields = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    reason = None
    if missing:
        reason = f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    elif os.geteuid() != 0:
        reason = "a local Slurm needs root (slurmd starts jobs as their user)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180
    )
    cluster = Slurm(state, {**os.environ, "SLURM_CONF": str(state / "slurm.conf")})
    try:
        assert started.returncode == 0, f"the local Slurm did not start:\n{started.stderr}\n{cluster.logs()}"
        yield cluster
    finally:
        # a cancelled job's processes belong to slurmstepd, not to the daemons: end them first
        subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cluster.run("squeue", "--noheader").strip():
            time.sleep(0.5)
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], timeout=60)


def wait_until(
    condition, seconds: float, what: str, slurm: Slurm, job_id: int, out: Path, fail_on_end: bool = True
):
    """Poll `condition()` until truthy; fail with the job's state and logs after `seconds` (or as
    soon as the job failed, with `fail_on_end`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        state = slurm.job(job_id).get("JobState")
        if fail_on_end and state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.05)
    run_logs = "".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in sorted(out.parent.rglob("*.log")))
    pytest.fail(
        f"{what}: not within {seconds}s; job {slurm.job(job_id)}\n"
        f"--- job output\n{out.read_text()[-6000:] if out.exists() else '(none)'}\n{run_logs}\n{slurm.logs()}"
    )


def submit(slurm: Slurm, name: str, run_dir: Path, out: Path, overrides: list[str], tasks: int = 1) -> int:
    """`sbatch slurm/train.sbatch OVERRIDES` from the repo root, sized for this CPU-only node."""
    env = {
        **slurm.env,
        "RUN_DIR": str(run_dir),
        "MAGITRAIN_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--ntasks-per-node={tasks}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=15",
        f"--output={out}",
        str(TEMPLATE),
        *overrides,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=30)
    return int(done.stdout.strip().split(";")[0])


def tiny_overrides(shards: Path, max_steps: int, every: int) -> list[str]:
    return [
        "model=tiny",
        "trainer=cpu",
        "strategy=auto",
        "callbacks.progress_bar=null",
        f"data.shards={shards}/*.tar",
        "data.num_workers=0",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]",
        f"trainer.max_steps={max_steps}",
        "trainer.log_every_n_steps=1",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "module.optim.warmup_steps=5",
    ]


def logged_losses(metrics_csv: Path, key: str = "train/loss") -> list[tuple[int, str]]:
    """(step, loss) of every row, in file order, duplicates (re-run steps) included."""
    with open(metrics_csv) as f:
        return [(int(r["step"]), r[key]) for r in csv.DictReader(f) if r.get(key)]


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows of a W&B offline `.wandb` file.

    W&B writes its records in LevelDB's log format (a 7-byte `:W&B` header, then 32 KiB blocks of
    chunks with a crc32/length/type header) as serialised `wandb_internal_pb2.Record`s; W&B ships
    no reader for it in Python.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of what has been written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                )
    return rows


def checkpoint_steps(run_dir: Path) -> dict[Path, int]:
    """Every checkpoint file of the run (wherever a callback or signal handler put it): its step."""
    return {
        p: torch.load(p, map_location="cpu", weights_only=True)["global_step"]
        for p in sorted(run_dir.rglob("*.ckpt"))
    }


def restored_from(rank_log: Path) -> Path:
    """The checkpoint the restarted job resumed from: Lightning logs it."""
    found = re.findall(r"Restoring states from the checkpoint path at (\S+)", rank_log.read_text())
    assert len(found) == 1, f"expected exactly one resume in {rank_log}, found {found}"
    return Path(found[0])


# Every recipe whose preemption the test covers: (max_steps, checkpoint interval, loss key, overrides).
# The interval is rare, so the newest checkpoint at preemption is the one the signal wrote.
PREEMPTED_RECIPES = [
    r for r in ("base_pretrain", "dmd2_distill") if (REPO / "recipes" / f"{r}.yaml").is_file()
]


def recipe_case(recipe: str, shards: Path, tmp_path: Path) -> tuple[int, int, str, list[str]]:
    if recipe == "base_pretrain":
        return 120, 40, "train/loss", tiny_overrides(shards, 120, 40)
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, tiny

    torch.manual_seed(0)
    teacher = save_official(MagiHumanDiT(tiny()), tmp_path / "teacher")
    overrides = [  # two optimisers; steps count generator updates, each after 2 critic updates
        "recipe=dmd2_distill",
        *tiny_overrides(shards, 30, 10),
        f"teacher={teacher}",
        "module.dmd.ttur=2",
        "module.optim.lr=1e-3",
        "module.critic_optim.lr=1e-3",
    ]
    return 30, 10, "train/generator_loss", overrides


@pytest.mark.parametrize("recipe", PREEMPTED_RECIPES)
def test_preempted_job_requeues_and_resumes_exactly(recipe, slurm, latent_shards, tmp_path):
    max_steps, every, loss_key, overrides = recipe_case(recipe, latent_shards, tmp_path)
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job_id = submit(slurm, f"magitrain-{recipe}", run_dir, out, [*overrides, "logger=wandb"])

    # 1. Let it train past its first periodic checkpoint, then preempt it the way Slurm does.
    # (The short sleep keeps the signal clear of the step that wrote that checkpoint.)
    rank_log = run_dir / "logs" / "train.rank0.log"
    first = run_dir / "checkpoints" / f"step{every:08d}.ckpt"
    wait_until(first.exists, 300, f"the job's step-{every} checkpoint", slurm, job_id, out)
    time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job_id))

    # 2. It requeues itself; a requeued job waits for its BeginTime, released here.
    wait_until(
        lambda: slurm.job(job_id).get("Restarts") == "1" and slurm.job(job_id)["JobState"] == "PENDING",
        90,
        "the job requeued itself after SIGUSR1",
        slurm,
        job_id,
        out,
    )
    before_restart = checkpoint_steps(run_dir)
    slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
    wait_until(
        lambda: slurm.job(job_id)["JobState"] == "COMPLETED",
        300,
        "the requeued job finished",
        slurm,
        job_id,
        out,
    )
    job_out = out.read_text()
    assert len(list((run_dir / "starts").iterdir())) == 2  # one record per start, in the one run directory
    assert re.search(rf"magitrain: job {job_id} restart 0 ", job_out), job_out
    assert re.search(rf"magitrain: job {job_id} restart 1 ", job_out), job_out  # SLURM_RESTART_COUNT=1

    # 3. The signal saved the step reached (beyond the periodic checkpoint, which `last.ckpt`
    # still names), and the restart resumed from exactly that newest checkpoint.
    step = max(before_restart.values())
    assert every < step < max_steps, before_restart
    resumed = restored_from(rank_log)
    assert before_restart.get(resumed) == step, f"resumed from {resumed}, newest: {before_restart}"

    # 4. Bit-equal to an uninterrupted run of the same seed and data.
    straight = train(compose_train(overrides, tmp_path / "straight"))
    want = straight.lightning_module.state_dict()
    final = torch.load(
        run_dir / "checkpoints" / f"step{max_steps:08d}.ckpt", map_location="cpu", weights_only=True
    )
    got = final["state_dict"]
    assert final["global_step"] == max_steps
    assert want.keys() == got.keys() and any(k.startswith("ema.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)

    # The metrics history spans the preemption: every step is there, the ones before the signal
    # too, and every loss logged (before and after the restart) is the uninterrupted run's.
    reference = dict(logged_losses(tmp_path / "straight" / "csv" / "metrics.csv", loss_key))
    history = logged_losses(run_dir / "csv" / "metrics.csv", loss_key)
    assert {s for s, _ in history} == set(range(max_steps)), sorted({s for s, _ in history})
    assert all(loss == reference[s] for s, loss in history), [
        (s, loss, reference[s]) for s, loss in history if loss != reference[s]
    ]

    # 5. W&B: both starts logged to one run (the id kept in the run directory), and the restart's
    # step axis (the trainer's global step, on the loss rows) continues from the resumed step. The
    # SIGTERM that ends the requeued job also ends W&B's service process, so the first start's
    # history may lack its last steps (docs/training.md).
    run_id = (run_dir / "wandb_run_id").read_text()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    assert torch.load(resumed, map_location="cpu", weights_only=True)["wandb_run_id"] == run_id
    steps = [
        [
            int(row["trainer/global_step"])
            for row in wandb_history(next(r.glob("run-*.wandb")))
            if loss_key in row
        ]
        for r in runs
    ]
    assert steps[0] and min(steps[0]) == 0 and max(steps[0]) <= step, steps[0]
    assert min(steps[1]) == step and max(steps[1]) == max_steps - 1, steps[1]


def run_job(slurm: Slurm, name: str, run_dir: Path, out: Path, overrides: list[str], tasks: int) -> str:
    """Submit, wait (bounded) until the job has ended, and return its final state."""
    job_id = submit(slurm, name, run_dir, out, overrides, tasks=tasks)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_until(
        lambda: slurm.job(job_id)["JobState"] in ended and slurm.job(job_id)["JobState"],
        300,
        f"job {name} ({tasks} tasks) ending",
        slurm,
        job_id,
        out,
        fail_on_end=False,
    )


def test_fsdp2_run_resumes_on_another_number_of_ranks(slurm, latent_shards, tmp_path):
    """docs/training.md, "Change the node count on resume": 2 FSDP2 ranks, then 1, same job name."""
    overrides = [
        *tiny_overrides(latent_shards, max_steps=4, every=4),
        "strategy=fsdp2",
        "module.parallel.param_dtype=float32",
        "module.optim.warmup_steps=1",
        "logger=csv",
    ]
    run_dir, name = tmp_path / "run", "magitrain-reshard"
    assert run_job(slurm, name, run_dir, tmp_path / "two.out", overrides, tasks=2) == "COMPLETED"
    saved = run_dir / "checkpoints" / "step00000004.ckpt"
    assert saved.is_dir() and len(list(saved.glob("*.distcp"))) == 2  # one shard file per rank
    # each rank logs to its own file; the ranks share one record of the start
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"train.rank0.log", "train.rank1.log"}
    assert len(list((run_dir / "starts").iterdir())) == 1

    # On one rank the data stream cannot continue exactly: the job stops and says why ...
    more = [*overrides, "trainer.max_steps=6"]
    assert run_job(slurm, name, run_dir, tmp_path / "strict.out", more, tasks=1) == "FAILED"
    assert "data.world_size: 2 -> 1" in (tmp_path / "strict.out").read_text()

    # ... unless told to restart the data epoch; weights, EMA and optimiser state are resharded.
    out = tmp_path / "one.out"
    assert run_job(slurm, name, run_dir, out, [*more, "data.strict_resume=false"], tasks=1) == "COMPLETED"
    log = (run_dir / "logs" / "train.rank0.log").read_text()
    assert "data plan changed (data.world_size: 2 -> 1): restarting data epoch" in log, log
    restored = re.findall(r"Restored all states from the checkpoint at (\S+)", log)
    # the strict try stopped while restoring the data state, before Lightning's "Restored all states"
    assert [Path(p).name for p in restored] == ["step00000004.ckpt"], restored
    final = run_dir / "checkpoints" / "step00000006.ckpt"
    assert final.is_dir() and len(list(final.glob("*.distcp"))) == 1
    resharded = {int(s) for s, _ in logged_losses(run_dir / "csv" / "metrics.csv")}
    assert resharded == set(range(6)), resharded


PROBE = """import json, os, sys
rank = os.environ["SLURM_PROCID"]
with open(os.path.join(os.environ["MAGITRAIN_RUN_DIR"], f"probe{rank}.json"), "w") as f:
    cpus = {"affinity": sorted(os.sched_getaffinity(0)), "srun": os.environ.get("SRUN_CPUS_PER_TASK")}
    json.dump({**cpus, "argv": sys.argv[1:]}, f)
"""


def test_each_rank_gets_the_cpus_per_task_of_the_job(slurm, tmp_path):
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: slurm/job.sh's srun bound
    every rank (and its loader workers) to one CPU of the --cpus-per-task=12 the job asked for.
    The real train.sbatch and job.sh run a probe `train.py` that reads the CPUs its task may use
    (the local Slurm binds tasks with task/affinity) and the per-task count srun was given. On 2
    cores a single task gets the whole allocation either way (srun's per-task default shows from
    two tasks of two CPUs each), so the count srun read is what tells here."""
    root = tmp_path / "root"  # MAGITRAIN_ROOT: the repo's slurm/ scripts, a probe train.py
    root.mkdir()
    (root / "slurm").symlink_to(REPO / "slurm")
    (root / "train.py").write_text(PROBE)
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {
        **slurm.env,
        "MAGITRAIN_ROOT": str(root),
        "RUN_DIR": str(run_dir),
        "MAGITRAIN_PYTHON": sys.executable,
    }
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2"]
    done = subprocess.run(
        [*cmd, "--time=5", f"--output={out}", str(TEMPLATE)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    job_id = int(done.stdout.strip().split(";")[0])
    wait_until(lambda: slurm.job(job_id)["JobState"] == "COMPLETED", 60, "the probe job", slurm, job_id, out)
    probe = json.loads((run_dir / "probe0.json").read_text())
    assert probe["argv"][:2] == ["cluster=slurm", "ckpt_path=last"], probe
    assert probe["srun"] == "2", f"srun was not given the job's --cpus-per-task=2: {probe}"
    assert len(probe["affinity"]) == 2, f"rank 0 may use CPUs {probe['affinity']} of the job's 2"
