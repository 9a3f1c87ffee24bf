#!/usr/bin/env bash
# FlashInfer-Bench (flashinfer-bench 0.1.2) on the GPU machine: mla-tuner's solutions for FlashInfer-Bench's six
# public mla_paged definitions, scored by its own harness against its own reference code, beside FlashInfer.
#
#   bash perf/fib_run.sh          # from the checkout root; logs, traces and the summary in $OUT
#
# Carry .whl (the wheels below) and .peers (FlashInfer, optional: without it there is no FlashInfer column).
# The machine has torch and triton but no network and none of FlashInfer-Bench's needs, so .whl must hold, for
# its Python (cp312, manylinux x86_64): flashinfer_bench-0.1.2 (installed without its dependencies: it asks for
# flashinfer-python, which .peers stages instead), pydantic, pydantic_core, annotated_types, typing_inspection,
# typing_extensions, safetensors, docstring_parser. They go into /tmp/fib-site, not the system.
#
# Steps: install; `mla-tune export-fib` writes the trace set (FlashInfer-Bench's definitions from tests/data/fib,
# checked against mla-tuner's; WORKLOADS serving-like workloads each; our solution and a FlashInfer one per
# definition); perf/fib_warm.py calls every solution once per workload, one process per definition at once (the
# Triton kernels and FlashInfer's JIT module compile into their disk caches); `flashinfer-bench run --local`;
# `python -m tuner.export.summary` prints the table last (status per workload, speedup over the reference and
# over FlashInfer). About 3-4 minutes on an H200.
# Env: OUT (/tmp/fib-out), WORKLOADS (3), PY (python3), LIMIT (seconds for everything, 240), FIB_WARMUP (5),
# FIB_ITERS (30), TRIALS (3): the harness's warm-up runs, timed runs and correctness trials per workload.
set -uo pipefail
T0=$(date +%s)
LIMIT=${LIMIT:-240}
OUT=${OUT:-/tmp/fib-out}
PY=${PY:-python3}
WORKLOADS=${WORKLOADS:-3}
DIR=/tmp/fib-traceset
SITE=/tmp/fib-site
export FIB_CACHE_PATH=/tmp/fib-cache PYTHONUNBUFFERED=1
mkdir -p "$OUT"
left() { echo $((LIMIT - ($(date +%s) - T0))); }
step() { echo "=== $* (t=$(($(date +%s) - T0)) s)"; }
die() { echo "fib_run: $*" >&2; exit 1; }

[ -f tuner/export/command.py ] && [ -d tests/data/fib ] || die "run from the checkout root (not $PWD)"

step "install flashinfer-bench and its data model's needs from .whl into $SITE"
wheels=()
for pkg in flashinfer_bench pydantic pydantic_core annotated_types typing_inspection typing_extensions safetensors \
           docstring_parser; do
    found=$(ls .whl/"$pkg"-[0-9]*.whl 2>/dev/null | head -n 1)
    [ -n "$found" ] || die "no .whl/$pkg-*.whl: carry .whl with the wheels this script's header lists"
    wheels+=("$found")
done
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; die "pip could not install ${wheels[*]}"; }

if [ -f .peers/activate.sh ]; then
    step "FlashInfer from .peers"
    # shellcheck disable=SC1091
    source .peers/activate.sh || echo "warning: .peers/activate.sh failed: no FlashInfer column"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
timeout 120 "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.log"
import importlib.metadata as md

import torch
import triton

import flashinfer_bench.data  # noqa: F401
import tuner

print("torch", torch.__version__, "triton", triton.__version__, "mla-tuner", tuner.__version__,
      "flashinfer-bench", md.version("flashinfer-bench"))
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device")
print("GPU:", torch.cuda.get_device_name(0))
EOF
[ "${PIPESTATUS[0]}" = 0 ] || die "the environment is not usable (above)"
WITH_FI=()
if fi_version=$(timeout 120 "$PY" -c "import flashinfer, flashinfer.mla; print(flashinfer.__version__)" 2>"$OUT/fi.log"); then
    echo "flashinfer $fi_version"
    WITH_FI=(--with-flashinfer)
else
    echo "warning: flashinfer.mla does not import (see $OUT/fi.log): no FlashInfer column"
fi

step "export the trace set into $DIR"
rm -rf "$DIR" "$FIB_CACHE_PATH"
timeout 120 "$PY" -m tuner export-fib "$DIR" --public --workloads "$WORKLOADS" --fib-definitions tests/data/fib \
    ${WITH_FI[@]+"${WITH_FI[@]}"} 2>&1 | tee "$OUT/export.log"
[ "${PIPESTATUS[0]}" = 0 ] || die "mla-tune export-fib failed"
defs=$(cd "$DIR/definitions/mla_paged" && ls -- *.json | sed 's/\.json$//')

step "compile: each solution once per workload, one process per definition"
pids=()
first=1
for d in $defs; do
    sols=("mla-tuner_$d")
    # FlashInfer compiles one MLA module for every definition here: warm it in one process only.
    if [ ${#WITH_FI[@]} -gt 0 ] && [ $first = 1 ]; then sols+=("flashinfer_$d"); fi
    first=0
    FIB_CACHE_PATH=/tmp/fib-warm-cache timeout 150 "$PY" perf/fib_warm.py "$DIR" "$d" "${sols[@]}" \
        >"$OUT/warm_$d.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || echo "warning: a warm-up process failed or timed out (logs: $OUT/warm_*.log); the run goes on"
done
cat "$OUT"/warm_*.log | grep -v "^\s*$" | tail -n 30

budget=$(($(left) - 20))
step "flashinfer-bench run --local $DIR (${budget} s)"
[ "$budget" -gt 30 ] || die "no time left for the run (LIMIT=$LIMIT)"
timeout "$budget" "$PY" -c "from flashinfer_bench.cli.main import cli; cli()" run --local "$DIR" \
    --warmup-runs "${FIB_WARMUP:-5}" --iterations "${FIB_ITERS:-30}" --num-trials "${TRIALS:-3}" --timeout 180 \
    --log-level INFO >"$OUT/fib_run.log" 2>&1
rc=$?
if [ $rc = 124 ]; then
    echo "warning: flashinfer-bench run hit the time limit: the table has the definitions that finished"
elif [ $rc != 0 ]; then
    echo "warning: flashinfer-bench run exited $rc (its log: $OUT/fib_run.log)"
    tail -n 20 "$OUT/fib_run.log"
fi
grep -E "PASSED|INCORRECT|RUNTIME_ERROR|COMPILE_ERROR|TIMEOUT|rror" "$OUT/fib_run.log" | tail -n 40
rm -rf "$OUT/traceset" && cp -r "$DIR" "$OUT/traceset"
[ -d "$FIB_CACHE_PATH/logs" ] && cp -r "$FIB_CACHE_PATH/logs" "$OUT/fib_logs"

step "summary"
"$PY" -m tuner.export.summary "$DIR" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
