#!/usr/bin/env bash
# Start an MLflow tracking server (UI + REST API) on the project's own store.
#
#   backend:   sqlite:///<root>/mlflow.db   (the same file local runs write without a server)
#   artifacts: <root>/mlruns                 (new experiments get <root>/mlruns/<id>, absolute,
#                                             exactly what a local SQLite client creates, and the
#                                             server reads run/model artifacts from those paths)
#
# Env overrides: MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (1),
# PERSONA_OPS_ROOT (the repository root: where mlflow.db and mlruns/ live).
# Extra arguments are passed to `mlflow server`.
set -euo pipefail

ROOT="${PERSONA_OPS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
ROOT="$(cd "$ROOT" && pwd)"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-1}"

# The GenAI job runner (online scoring, trace archival: eight more processes) has no use here.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

mkdir -p "$ROOT/mlruns"
cd "$ROOT"
echo "mlflow server: http://$HOST:$PORT  store=sqlite:///$ROOT/mlflow.db  artifacts=$ROOT/mlruns" >&2
# --no-serve-artifacts: clients on this machine write artifacts straight to <root>/mlruns
# (no mlflow-artifacts:/ proxy URIs, which a server-less client could not resolve).
exec mlflow server \
    --backend-store-uri "sqlite:///$ROOT/mlflow.db" \
    --default-artifact-root "$ROOT/mlruns" \
    --no-serve-artifacts \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    "$@"
