#!/usr/bin/env bash
# Serve a registered embed-then-cluster model on 127.0.0.1 with MLflow's scoring server.
#   serving/serve.sh [MODEL_URI] [PORT]
# MODEL_URI defaults to models:/contrastive-sc@champion; any models:/ or runs:/ URI works.
# The tracking/registry store comes from MLFLOW_TRACKING_URI (default: ./mlflow.db).
# The server has no authentication: keep it on 127.0.0.1 and put a proxy in front (README.md).
set -euo pipefail
MODEL_URI="${1:-models:/contrastive-sc@champion}"
PORT="${2:-5001}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
# `mlflow models serve` execs uvicorn by name: the interpreter's bin folder must be on PATH.
BIN_DIR="$(dirname "$(command -v python)")"
export PATH="$BIN_DIR:$PATH"
exec mlflow models serve -m "$MODEL_URI" --env-manager local -h 127.0.0.1 -p "$PORT"
