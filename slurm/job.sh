#!/usr/bin/env bash
# The batch step of slurm/train.sbatch and slurm/train_multinode.sbatch: a stable run directory,
# one W&B run id per run, then `srun python train.py` (one task per GPU). Arguments: train.py overrides.
set -euo pipefail
: "${SLURM_JOB_ID:?slurm/job.sh runs inside a job: sbatch slurm/train.sbatch ...}"
cd "${MAGITRAIN_ROOT:-$SLURM_SUBMIT_DIR}"

# Keyed by the job name, not the job id: the requeued job (same id) and a resubmission (new id,
# same --job-name) find the run's checkpoints. Created here once, before any rank starts.
export MAGITRAIN_RUN_DIR=${RUN_DIR:-outputs/$SLURM_JOB_NAME}
mkdir -p "$MAGITRAIN_RUN_DIR/logs"
# this start's record directory, <run dir>/starts/<time> (conf/cluster/slurm.yaml): one for all ranks
export MAGITRAIN_START_TIME=$(date +%Y-%m-%d_%H-%M-%S_%6N)

# The W&B run id lives in the run directory from the first start on (even one preempted before its
# first checkpoint), so every restart appends to the same W&B run; its step axis is the global step.
id_file=$MAGITRAIN_RUN_DIR/wandb_run_id
[ -s "$id_file" ] || (tr -dc 'a-z0-9' </dev/urandom || true) | head -c 8 >"$id_file"
export WANDB_RUN_ID=$(<"$id_file") WANDB_RESUME=allow

echo "magitrain: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}" \
    "nodes $SLURM_JOB_NUM_NODES tasks $SLURM_NTASKS run_dir $MAGITRAIN_RUN_DIR wandb_run_id $WANDB_RUN_ID"

# `--signal=USR1@120` signals the tasks directly; `scancel --signal=USR1 --batch` (or a site's
# preemption signal to the batch shell) arrives here and is passed on: srun forwards it to the tasks.
trap 'echo "magitrain: SIGUSR1 -> tasks"; kill -USR1 "${srun_pid:-}" 2>/dev/null || true' USR1

# Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without this, task/affinity
# or task/cgroup binds each rank and its DataLoader workers to one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

# cluster=slurm: Lightning's SLURMEnvironment (auto-requeue on SIGUSR1), this run directory, one
# log file per rank (conf/cluster/slurm.yaml); ckpt_path=last: resume from the run's newest checkpoint;
# run_name: W&B names the run after the job.
# MAGITRAIN_PYTHON: the interpreter (default: `python` on the PATH the job was submitted with).
srun --label --kill-on-bad-exit=1 "${MAGITRAIN_PYTHON:-python}" train.py \
    cluster=slurm ckpt_path=last run_name="$SLURM_JOB_NAME" \
    trainer.devices="$SLURM_NTASKS_PER_NODE" trainer.num_nodes="$SLURM_JOB_NUM_NODES" "$@" &
srun_pid=$!

status=0
while :; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break # a trapped signal interrupts `wait`; srun still runs
done
exit "$status"
