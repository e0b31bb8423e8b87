#!/usr/bin/env bash
# The GPU check, one command: the CUDA tests (tests/test_cuda.py) and the GPU benchmarks
# (benchmarks/bench_gpu.py), every figure in one report. Needs only Python with PyTorch, numpy,
# pandas, scikit-learn, safetensors and pytest: the tests that need Prefect and MLflow run where
# those are installed and are skipped, saying so, where not. On a machine without CUDA it says
# so and exits 0 having run nothing. About 6 minutes on one H100-class GPU.
#
#   scripts/gpu-check.sh [REPORT]   REPORT: default $OUT/gpu-report.md where OUT is set, else gpu-report.md
#   env: PYTHON (default .venv/bin/python, else python3); RNNFLOW_SHARED_DATA (tinyshakespeare.txt
#        and m4/, default ../shared/data); GPU_CHECK_MINUTES (the quality run's budget, default 3);
#        GPU_CHECK_RECIPES (space-separated recipes of bench_gpu.py, run side by side)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
REPORT=${1:-${OUT:+$OUT/}gpu-report.md}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False in $PY); nothing run"
  exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=true PREFECT_LOGGING_LEVEL=WARNING
ROWS="${REPORT%.md}.jsonl"; LOG="${REPORT%.md}-pytest.log"; : > "$ROWS"  # beside the report: kept if cut short
MINUTES=${GPU_CHECK_MINUTES:-3}
RECIPES=(${GPU_CHECK_RECIPES:-2x1024-d0.4 3x512-d0.3})
status=0
start=$(date +%s)

section() { echo; echo "## $1" | tee -a "$REPORT"; }
{
  echo "# rnnflow GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" - <<'PY'
import importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
for m in ("prefect", "mlflow"):
    print(f"{m}: {'installed' if importlib.util.find_spec(m) else 'NOT installed: its tests are skipped'}")
PY
  echo '```'
} > "$REPORT"
cat "$REPORT"

section "CUDA tests (pytest -m cuda tests/test_cuda.py)"
timeout 300 "$PY" -m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=1
{ echo '```'; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$LOG" | tail -40; echo '```'; } >> "$REPORT"

section "Throughput (benchmarks/bench_gpu.py)"
timeout 240 "$PY" benchmarks/bench_gpu.py --sections charlm,forecaster,global,scale --json "$ROWS" || status=1

section "Tiny Shakespeare in $MINUTES minutes of GPU training (recipes side by side: ${RECIPES[*]})"
timeout $((${MINUTES%.*} * 60 + 120)) "$PY" benchmarks/bench_gpu.py --sections quality --minutes "$MINUTES" \
  $(printf -- '--recipe %s ' "${RECIPES[@]}") --json "$ROWS" || status=1

{ echo; echo "## Every figure (JSON lines)"; echo '```'; cat "$ROWS"; echo '```'
  echo; echo "gpu-check: $(( $(date +%s) - start )) s, exit status $status"; } >> "$REPORT"
echo; echo "gpu-check: report in $REPORT ($(( $(date +%s) - start )) s, exit status $status)"
exit $status
