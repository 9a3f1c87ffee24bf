#!/usr/bin/env bash
# One GPU call for the narrow (swapped-product) decode at < 64 heads: its GPU tests, a probe beside fa3,
# then (only if the tests pass) a re-tune of the 16-head decode kernels and the bench. Logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import optuna" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MLA_TUNER_CACHE_DIR="$PWD/build/mla-cache"
T0=$(date +%s); t() { echo "t=$(($(date +%s) - T0)) s"; }
timeout 150 python3 -m pytest tests/gpu -n 8 -q -p no:cacheprovider -k "test_gpu_decode and not h128 and not h64" 2>&1 \
    | tail -3 | tee "$OUT/narrow_tests.log"; t
grep -q " passed" "$OUT/narrow_tests.log" && ! grep -q "failed\|error" "$OUT/narrow_tests.log" || { echo "tests failed: stop"; exit 1; }
(source .peers/activate.sh && timeout 120 python3 perf/probe.py decode gather \
    rows=d-b1-1k,d-b32-4k,d-b64-8k,d-b128-2k,d-b256-4k,d-b16-32k,d-b64-skew) 2>&1 | grep -v "Deprecat\|return lambda" \
    > "$OUT/narrow_probe.log"; grep "^|" "$OUT/narrow_probe.log"; grep -c FAIL "$OUT/narrow_probe.log"; t
timeout 170 python3 -m tuner tune --variant decode 2>&1 | grep -v "trials:" > "$OUT/tune_h16.log"; tail -14 "$OUT/tune_h16.log"
cp generated/dispatch/*.json "$OUT/"; t
(source .peers/activate.sh && timeout 150 python3 -m tuner bench --out "$OUT/results") 2>&1 \
    | grep -v "Deprecat\|return lambda\|warnings.warn" > "$OUT/bench.log"; grep -E "^(d|p)-" "$OUT/bench.log" | cut -c1-110; t
