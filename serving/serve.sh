#!/usr/bin/env bash
# Serve a registered embed-then-cluster model on 127.0.0.1 with MLflow's scoring server.
#   serving/serve.sh [MODEL_URI] [PORT]
# MODEL_URI defaults to models:/contrastive-sc@champion; any models:/ or runs:/ URI or a local model folder works.
# The tracking/registry store comes from MLFLOW_TRACKING_URI (default: ./mlflow.db).
# The server has no authentication, and the model refuses an oversized body only once MLflow has read
# it: keep it on 127.0.0.1 and put a proxy in front (serving/README.md).
#
# Settings (environment variables):
#   CONTRASTIVE_SC_WORKERS                 uvicorn worker processes, each with its own model copy (default 1)
#   MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT  seconds before MLflow answers a request 504 (default 120); MLflow does
#                                          not stop the request's thread, so the model stops its own slow work first:
#   CONTRASTIVE_SC_CLUSTER_TIMEOUT         seconds a request that clusters in a separate process may take from when
#                                          its body was read (default 60, or half the server's limit if less; at most
#                                          the server's limit - 5, else the server refuses to start); at the
#                                          limit the process is killed and the model answers 504 with its message
#   CONTRASTIVE_SC_HEAVY_SLOTS             such processes at once per worker (default 1); beyond them a request is
#                                          answered 503 "busy, retry" at once, so quick requests always find a thread
#   CONTRASTIVE_SC_INLINE_WORK             clustering work (cells x neighbours or clusters) up to which a request
#                                          clusters in its own thread, without a process (default 100000)
#   CONTRASTIVE_SC_MAX_GRAPH_EDGES         budget of a leiden/auto request, cells x n_neighbors (default 2000000)
#   CONTRASTIVE_SC_MAX_KMEANS_WORK         budget of a kmeans request, cells x n_clusters (default 1000000)
#   CONTRASTIVE_SC_MAX_INPUT_VALUES        budget of any request's table, cells x genes (default 20000000)
#   CONTRASTIVE_SC_MAX_BODY_BYTES          longest body, refused before parsing (default 32000000: MLflow parses
#                                          JSON at ~0.6 us a byte, so 32 MB takes ~20 s on 2 busy cores)
#   CONTRASTIVE_SC_INLINE_BODY_BYTES       JSON bodies longer than this are parsed and answered whole in a killable
#                                          process too, under the same slots and limit (default 4000000)
#     A request over a budget is answered 400 naming it and what fits. The defaults were measured on 2 cores
#     (docs/serving.md, Serving under load; contrastive_sc/serve/limits.py): the largest clustering they admit
#     takes about a third of the 60 s; `contrastive-sc load-benchmark` measures a server under slow requests.
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
