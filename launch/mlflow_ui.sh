#!/usr/bin/env bash
# `make mlflow-ui`: the MLflow UI over the project's default store, bound to loopback only.
# STORE, HOST and PORT may be overridden from the environment, e.g. `PORT=5001 make mlflow-ui`.
set -euo pipefail
STORE="${STORE:-sqlite:///mlruns.db}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
MLFLOW="${MLFLOW:-$(dirname "$0")/../.venv/bin/mlflow}"
export MLFLOW_DISABLE_TELEMETRY=true
# No job runner (7 huey processes for GenAI features that dd-dist's runs do not use)
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "MLflow UI: http://$HOST:$PORT  (store $STORE; Ctrl-C stops it)"
# MLflow 3.17 opens an experiment in its GenAI view until the browser has chosen otherwise once.
echo "  pick 'Model training' at its top left once (the browser keeps it), or open the link the pipeline printed"
exec "$MLFLOW" ui --backend-store-uri "$STORE" --host "$HOST" --port "$PORT"
