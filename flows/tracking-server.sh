#!/usr/bin/env bash
# A shared MLflow tracking server on a throwaway PostgreSQL, for trying rnnflow the way a team
# runs it: `make tracking-server` (Ctrl-C stops both and removes the data), then in another shell
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT:-5050}
#   make run
set -euo pipefail
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-5050}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGD=$(mktemp -d /tmp/rnnflow-pg.XXXXXX)
chown postgres:postgres "$PGD"   # initdb refuses to run as root

cleanup() {
  [ -n "${MLFLOW_PID:-}" ] && kill "$MLFLOW_PID" 2>/dev/null && wait "$MLFLOW_PID" 2>/dev/null || true
  runuser -u postgres -- pg_ctl -D "$PGD/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PGD"
}
trap cleanup EXIT INT TERM

runuser -u postgres -- initdb -D "$PGD/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
runuser -u postgres -- pg_ctl -D "$PGD/data" -l "$PGD/pg.log" -o "-h 127.0.0.1 -p $PG_PORT -k $PGD" -w start >/dev/null
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -q -c "create database mlflow"
mkdir -p "$PGD/artifacts"

echo "PostgreSQL on 127.0.0.1:$PG_PORT; MLflow tracking server on http://127.0.0.1:$MLFLOW_PORT"
echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
PATH="$ROOT/.venv/bin:$PATH" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$ROOT/.venv/bin/python" -m mlflow server \
  --backend-store-uri "postgresql://postgres@127.0.0.1:$PG_PORT/mlflow" \
  --artifacts-destination "$PGD/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 &
MLFLOW_PID=$!
wait "$MLFLOW_PID"
