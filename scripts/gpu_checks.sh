#!/usr/bin/env bash
# Every GPU check in ONE call of at most 8 minutes (see scripts/gpu_checks.py for the sections, in
# priority order, and the budget):
#   scripts/gpu_checks.sh --out outputs/gpu_checks                 # --budget-s 480 (the default)
#   scripts/gpu_checks.sh --out outputs/gpu_checks --only training # a rerun of one part
#   scripts/gpu_checks.sh --dry-run --out /tmp/dry                 # the same code paths at toy size on a CPU
# The script stops itself at its budget; this timeout is the net under it (SIGTERM: the running
# section is recorded as cut short and the files written).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "${GPU_CHECKS_TIMEOUT_S:-540}" python scripts/gpu_checks.py "$@"
