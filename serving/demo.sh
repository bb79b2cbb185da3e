#!/usr/bin/env bash
# The main job on an embedded dataset (no download): train -> register -> promote -> export
# ONNX -> serve -> query once -> stop. Everything lands in $DEMO_DIR (default demo_out/),
# tracked in a local SQLite store. Run from the repository root: `make demo`.
set -euo pipefail
DEMO_DIR="${DEMO_DIR:-demo_out}"
MODEL_NAME="${MODEL_NAME:-contrastive-sc}"
mkdir -p "$DEMO_DIR"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$(cd "$DEMO_DIR" && pwd)/mlflow.db}"
export MLFLOW_EXPERIMENT_NAME="${MLFLOW_EXPERIMENT_NAME:-contrastive-sc}"
step() { printf '\n== %s\n' "$*"; }
# Is the server up? (python, not curl: the demo needs nothing the project does not install)
ready() { python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null; }

# Create the experiment first so its artifacts live in $DEMO_DIR beside the database.
MLFLOW_LOGGING_LEVEL=WARNING python -c "from contrastive_sc.mlops.tracking import ensure_experiment; ensure_experiment('$MLFLOW_EXPERIMENT_NAME')"

step "1/6 train the default preset (fused) on the built-in simulated dataset (mlflow run -e train)"
mlflow run . -e train --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" \
  -P data=simulated -P label_key=label 2>&1 | grep -E "^run |succeeded|failed|Error" || true

step "2/6 register the best run as $MODEL_NAME (@challenger)"
python -m contrastive_sc register --name "$MODEL_NAME" --experiment "$MLFLOW_EXPERIMENT_NAME"

step "3/6 promote it to @champion if it beats the current champion"
python -m contrastive_sc promote --name "$MODEL_NAME"
echo "the model to use: models:/$MODEL_NAME@champion"

step "4/6 export the champion's encoder to ONNX (parity checked against torch)"
python -m contrastive_sc export-onnx --model-uri "models:/$MODEL_NAME@champion" --out "$DEMO_DIR/encoder.onnx"

step "5/6 serve models:/$MODEL_NAME@champion on 127.0.0.1"
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
bash serving/serve.sh "models:/$MODEL_NAME@champion" "$PORT" > "$DEMO_DIR/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if ready "http://127.0.0.1:$PORT/ping"; then break; fi
  if ! kill -0 $SERVER_PID 2>/dev/null; then cat "$DEMO_DIR/server.log"; echo "server exited" >&2; exit 1; fi
  sleep 1
done
ready "http://127.0.0.1:$PORT/ping" || { cat "$DEMO_DIR/server.log"; echo "server not ready" >&2; exit 1; }
echo "serving on http://127.0.0.1:$PORT (log: $DEMO_DIR/server.log)"

step "6/6 query the endpoint with 300 simulated cells (the training clusters)"
python serving/client.py --url "http://127.0.0.1:$PORT" --data simulated --max-cells 300 \
  --model-uri "models:/$MODEL_NAME@champion" --out "$DEMO_DIR/clusters.csv"
head -n 6 "$DEMO_DIR/clusters.csv"
echo
echo "done: browse the runs with  mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI"
