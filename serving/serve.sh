#!/usr/bin/env bash
# Serve a registered embed-then-cluster model on 127.0.0.1 with MLflow's scoring server.
#   serving/serve.sh [MODEL_URI] [PORT]
# MODEL_URI defaults to models:/contrastive-sc@champion; any models:/ or runs:/ URI or a local model folder works.
# The tracking/registry store comes from MLFLOW_TRACKING_URI (default: ./mlflow.db).
# The server has no authentication and no body-size limit: keep it on 127.0.0.1 and put a proxy
# in front (serving/README.md).
#
# Settings (environment variables):
#   CONTRASTIVE_SC_WORKERS                 uvicorn worker processes, each with its own model copy (default 1)
#   MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT  seconds before a request is answered 504 (default 120); the worker
#                                          keeps computing the abandoned request, so run >= 2 workers
#                                          if a slow request must not block the others
#   CONTRASTIVE_SC_ONNX_THREADS            onnxruntime threads per worker (default: cores // workers)
#                                          Many concurrent clients: one worker per core and 1 thread each
#                                          (CONTRASTIVE_SC_WORKERS=$(nproc) CONTRASTIVE_SC_ONNX_THREADS=1);
#                                          `contrastive-sc speed-benchmark --workers N --threads T` measures it
#   CONTRASTIVE_SC_MAX_CELLS               cells accepted in one request (default 10000); larger datasets go
#                                          through the batch entry point `python -m contrastive_sc embed`
#   CONTRASTIVE_SC_ENV_MANAGER             local (default: this Python environment), virtualenv or uv (build
#                                          the model's own environment from its pinned requirements.txt)
set -euo pipefail
MODEL_URI="${1:-models:/contrastive-sc@champion}"
PORT="${2:-5001}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
export CONTRASTIVE_SC_WORKERS="${CONTRASTIVE_SC_WORKERS:-1}"
export MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="${MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT:-120}"
# Quiet: no download bars, no INFO lines (MLFLOW_LOGGING_LEVEL=INFO brings them back).
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="${MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR:-false}"
export MLFLOW_LOGGING_LEVEL="${MLFLOW_LOGGING_LEVEL:-WARNING}"
ENV_MANAGER="${CONTRASTIVE_SC_ENV_MANAGER:-local}"
# `mlflow models serve` execs uvicorn by name: the interpreter's bin folder must be on PATH.
BIN_DIR="$(dirname "$(command -v python)")"
export PATH="$BIN_DIR:$PATH"
exec mlflow models serve -m "$MODEL_URI" --env-manager "$ENV_MANAGER" -h 127.0.0.1 -p "$PORT" \
  -w "$CONTRASTIVE_SC_WORKERS" -t "$MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
