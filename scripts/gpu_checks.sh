#!/usr/bin/env bash
# Every GPU check (see scripts/gpu_checks.py for what runs; two calls with --only fit the device's
# 10-minute limit per command), each call at most 9.5 minutes:
#   scripts/gpu_checks.sh --out outputs/gpu_checks --only tests training dmd_slice plan_vs_gpu
#   scripts/gpu_checks.sh --out outputs/gpu_checks --only slice table2 decode step_compile  # adds to the first
#   scripts/gpu_checks.sh --dry-run --out /tmp/dry      # the same code paths at toy size on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 570 python scripts/gpu_checks.py "$@"
