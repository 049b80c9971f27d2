#!/usr/bin/env bash
# The GPU check (issue 20) on a clean checkout of a machine with a CUDA GPU, in under 8 minutes on one GPU:
# installs (make setup), runs the gpu tests with DeepSpeed's own accelerator choice (CUDA), then writes
# benchmarks/results/gpu.{json,md} (benchmarks/gpu.py). Exits non-zero where there is no GPU or a test fails.
#
# PYTHON=/path/to/python benchmarks/gpu_check.sh uses that interpreter's packages instead of installing (a machine
# with no package index, or a CUDA build of torch already there); the checkout goes on its PYTHONPATH. On a machine
# whose Python lacks dd-dist's packages and cannot reach an index, benchmarks/gpu_kit.sh packs them here first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
if [[ -z "${PYTHON:-}" ]]; then
    make setup
    PYTHON=.venv/bin/python
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
# the browser test imports playwright, a test extra that such an interpreter may lack; it has no gpu test
"$PYTHON" -m pytest -q -m gpu tests --ignore=tests/test_browser.py
"$PYTHON" -m benchmarks.gpu
