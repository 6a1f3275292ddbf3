#!/usr/bin/env bash
# One short accelerator check (< 8 minutes on one GPU): training throughput,
# seed-axis strategies, PGD, Arachne, one Apricot reduced-model epoch,
# search populations and the multi-layer fitness forms.
# Writes ${OUT:-runs/bench}/device_check.json. Usage (repository root):
#   bash benchmarks/device_check.sh            # on the accelerator machine
#   bash benchmarks/device_check.sh --quick    # CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
# GPU: do not grab 75% of device memory up front (several processes may share it).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec timeout 470 "$PY" -m benchmarks.device_check --out="$OUT/device_check.json" "$@"
