#!/usr/bin/env bash
# A shared MLflow tracking server on a throwaway PostgreSQL, for trying rnnflow the way a team
# runs it: `make tracking-server` (Ctrl-C stops both and removes the data), then in another shell
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT:-5050}
#   make run
#
#   scripts/tracking-server.sh [--auth] [--sqlite]
#   --auth    MLflow's basic-auth app: every request needs a login, a new user may touch nothing
#             (NO_PERMISSIONS) until granted; the admin user (RNNFLOW_ADMIN_USER, default admin)
#             gets the password in RNNFLOW_ADMIN_PASSWORD (12 characters or more). Its users and
#             permissions live beside the store, in the same throwaway folder.
#   --sqlite  the store in a SQLite file instead of PostgreSQL (no PostgreSQL needed)
set -euo pipefail
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-5050}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AUTH=0 BACKEND=postgresql
for arg in "$@"; do
  case "$arg" in
    --auth) AUTH=1 ;;
    --sqlite) BACKEND=sqlite ;;
    -h | --help) sed -n '7,12p' "$0" | cut -c3-; exit 0 ;;
    *) echo "error: unknown option $arg (scripts/tracking-server.sh takes --auth and --sqlite)" >&2; exit 2 ;;
  esac
done

# Refused before anything starts: MLflow would create the admin with a password anyone can guess.
if [ "$AUTH" = 1 ]; then
  why=""
  case "${RNNFLOW_ADMIN_PASSWORD:-}" in
    "") why="is not set: export it with the admin's password" ;;
    password1234) why="is MLflow's published default password: choose another" ;;
    *) [ ${#RNNFLOW_ADMIN_PASSWORD} -ge 12 ] || why="is shorter than the 12 characters MLflow requires" ;;
  esac
  if [ -n "$why" ]; then echo "error: --auth: RNNFLOW_ADMIN_PASSWORD $why" >&2; exit 1; fi
fi
if [ "$BACKEND" = postgresql ] && ! { command -v initdb && command -v pg_ctl; } >/dev/null; then
  echo "error: PostgreSQL's initdb and pg_ctl are not on PATH: install PostgreSQL, or pass --sqlite" >&2
  exit 1
fi

DATA=$(mktemp -d /tmp/rnnflow-tracking.XXXXXX)   # pg/ PostgreSQL's (its user's), mlflow/ the rest (root's only)
cleanup() {
  [ -n "${MLFLOW_PID:-}" ] && kill "$MLFLOW_PID" 2>/dev/null && wait "$MLFLOW_PID" 2>/dev/null || true
  [ "$BACKEND" = postgresql ] && runuser -u postgres -- pg_ctl -D "$DATA/pg/data" -m fast -w stop >/dev/null 2>&1
  rm -rf "$DATA"
}
trap cleanup EXIT INT TERM
mkdir -m 700 "$DATA/mlflow" "$DATA/mlflow/artifacts"

if [ "$BACKEND" = postgresql ]; then
  chmod 711 "$DATA" && mkdir "$DATA/pg" && chown postgres:postgres "$DATA/pg"   # initdb refuses to run as root
  runuser -u postgres -- initdb -D "$DATA/pg/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  runuser -u postgres -- pg_ctl -D "$DATA/pg/data" -l "$DATA/pg/pg.log" -o "-h 127.0.0.1 -p $PG_PORT -k $DATA/pg" \
    -w start >/dev/null
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -q -c "create database mlflow"
  STORE="postgresql://postgres@127.0.0.1:$PG_PORT/mlflow"
  echo "PostgreSQL on 127.0.0.1:$PG_PORT"
else
  STORE="sqlite:///$DATA/mlflow/mlflow.db"
fi

APP=()
if [ "$AUTH" = 1 ]; then
  # MLflow's basic_auth.ini keys; the password goes by environment (MLFLOW_AUTH_ADMIN_PASSWORD), not to disk.
  # Each request's password check is a deliberately slow hash, and a training run's registration makes
  # dozens of requests: a login that passed is remembered for a while (a wrong one never is). With one
  # worker, a password changed or a user deleted through the API takes effect at once all the same.
  cat >"$DATA/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$DATA/mlflow/basic_auth.db
admin_username = ${RNNFLOW_ADMIN_USER:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
EOF
  export MLFLOW_AUTH_CONFIG_PATH="$DATA/mlflow/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$RNNFLOW_ADMIN_PASSWORD"
  # signs the sign-up form's CSRF token; a server of its own needs no fixed one
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}"
  APP=(--app-name basic-auth)
fi

echo "MLflow tracking server on http://127.0.0.1:$MLFLOW_PORT${APP:+ with logins (admin: ${RNNFLOW_ADMIN_USER:-admin})}"
echo "  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
[ "$AUTH" = 1 ] && echo "  export MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password>"
PATH="$ROOT/.venv/bin:$PATH" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$ROOT/.venv/bin/python" -m mlflow server \
  --backend-store-uri "$STORE" --artifacts-destination "$DATA/mlflow/artifacts" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 "${APP[@]}" &
MLFLOW_PID=$!
wait "$MLFLOW_PID"
