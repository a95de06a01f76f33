#!/usr/bin/env bash
# The GPU checks in one command, on a host with NVIDIA GPUs and CUDA 12 (JAX only:
# the device machines this project may be lent have no TensorFlow):
#
#   bash benchmarks/gpu.sh [OUT]        # default OUT: benchmarks/results/gpu
#
# Installs JAX with CUDA into the test environment (make venv first, or any
# environment with this package installed: PYTHON=...), then runs the
# benchmarks whose GPU figures benchmarks/README.md asks for. Each script
# prints its table and writes JSON and markdown into OUT; a failing script
# does not stop the others, and the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PYTHON=${PYTHON:-.venv/bin/python}
export KERAS_BACKEND=jax
"$PYTHON" -m pip install --quiet -U "jax[cuda12]" || exit 1
"$PYTHON" -c "import jax; d = jax.devices(); print(d); assert d[0].platform == 'gpu', 'no GPU'" || exit 1
gpus=$("$PYTHON" -c "import jax; print(len(jax.devices()))")
mkdir -p "$OUT"
failed=""
run() {
    echo "== $*"
    "$PYTHON" "$@" --backend jax --out "$OUT" || failed="$failed $1"
}
run benchmarks/checkpoint_blocking.py          # target: fit overhead of ours async <= 3.5 %
run benchmarks/callback_overhead.py            # target: the three together <= +2 %
run benchmarks/early_stopping_overhead.py      # target: <= 1 % of step time
run benchmarks/activation_logger_cost.py
run benchmarks/data_parallel.py
if [ "$gpus" -ge 2 ]; then
    run benchmarks/model_parallel.py --mesh "1x$gpus"
fi
[ -z "$failed" ] || { echo "== FAILED:$failed"; exit 1; }
