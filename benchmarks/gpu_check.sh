#!/usr/bin/env bash
# The one-command GPU check (see benchmarks/gpu_check.py): tests on the GPU, the layer and network
# benchmarks eager and compiled, and a torchrun run, in at most 8 minutes.
#   bash benchmarks/gpu_check.sh                                   # writes benchmarks/results_gpu.txt
#   bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/check.txt
# Runs from a checkout without installing normlab (src/ goes on PYTHONPATH); PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
