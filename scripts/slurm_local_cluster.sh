#!/usr/bin/env bash
# A real one-node Slurm on this host (loopback), for the `slurm` tests and for trying slurm/ locally.
#   scripts/slurm_local_cluster.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch, squeue, scontrol ... talk to it
#   scripts/slurm_local_cluster.sh stop DIR    # stops the three daemons started for DIR
# Needs root and Debian's `slurm-wlm` and `munge` (.ci/run installs them). Everything it writes
# stays in DIR: its own munge key and socket, state, spool and logs; /etc is not touched.
# SLURM_CPUS (default 2), SLURMCTLD_PORT (6817) and SLURMD_PORT (6818) can be set.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")

stop() {
    # slurmd first (it would otherwise keep re-registering), munged last (the others use it)
    for name in slurmd slurmctld munged; do
        local pidfile="$dir/$name.pid"
        [ -s "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$pidfile"
    done
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "local Slurm: $what did not come up within ${seconds}s; logs in $dir" >&2
    tail -n 20 "$dir"/*.log >&2 || true
    stop
    exit 1
}

start() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "local Slurm: '$tool' not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
    done
    [ "$(id -u)" -eq 0 ] || { echo "local Slurm: needs root (slurmd runs jobs as their user)" >&2; exit 1; }
    stop  # a previous cluster in the same DIR
    mkdir -p "$dir"/{munge,state,spool}
    chmod 700 "$dir" "$dir/munge"
    [ -s "$dir/munge/munge.key" ] || {
        head -c 1024 /dev/urandom >"$dir/munge/munge.key"
        chmod 400 "$dir/munge/munge.key"
    }
    local host cpus
    host=$(hostname -s)
    cpus=${SLURM_CPUS:-2}
    cat >"$dir/slurm.conf" <<EOF
# written by scripts/slurm_local_cluster.sh: one node on loopback
ClusterName=magitrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in containers: plain process tracking; tasks are bound to their CPUs by affinity
# (sched_setaffinity), as task/affinity or task/cgroup do on a real cluster
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node as configured here, whatever the host's real topology
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# short waits: a cancelled or requeued job's processes get SIGKILL 5 s after SIGTERM
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
    wait_for 20 munged test -S "$dir/munge/munge.socket"
    slurmctld -f "$dir/slurm.conf"
    wait_for 60 slurmctld scontrol ping
    slurmd -f "$dir/slurm.conf"
    wait_for 60 "slurmd (node idle)" bash -c "sinfo -h -N -o %t | grep -qx idle"
    echo "local Slurm up: export SLURM_CONF=$dir/slurm.conf"
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
