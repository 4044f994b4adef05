#!/usr/bin/env bash
# Every GPU check in one call of at most 8 minutes (see scripts/gpu_checks.py for what runs):
#   scripts/gpu_checks.sh --out outputs/gpu_checks      # on a machine with one H100/H200
#   scripts/gpu_checks.sh --dry-run --out /tmp/dry      # the same code paths at toy size on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python scripts/gpu_checks.py "$@"
