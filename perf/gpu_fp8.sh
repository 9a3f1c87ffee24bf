#!/usr/bin/env bash
# The fp8 GPU run of issue 18 in one device call (logs in $OUT): the fp8 GPU tests, perf/fp8_probe.py --quick
# on a few rows, then `mla-tune bench` over an fp8 cache beside FlashInfer fa3 (fp8 cache) and FlashMLA (fp8)
# at page size 64. Needs .peers carried for the bench.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLA_TUNER_CACHE_DIR="$PWD/build/mla-cache"
timeout 70 python3 -m pytest tests/gpu/test_gpu_fp8.py -n 8 -q -p no:cacheprovider -s 2>&1 | tee "$OUT/gpu_fp8_tests.log" \
    | grep -E "passed|failed|fp8 vs the bf16" | tail -4
timeout 140 python3 perf/fp8_probe.py --quick ${PROBE_ROWS:-d-b64-8k:64 d-b64-8k:1 d-h128-b128-4k:64} 2>&1 \
    | tee "$OUT/fp8_probe.log" | grep -E "^\|"
(source .peers/activate.sh && export PYTHONPATH="$PWD:$PYTHONPATH" && timeout 150 python3 -m tuner bench --kv-dtype fp8 \
    --rows ${BENCH_ROWS:-d-b1-1k d-b32-4k d-b64-8k d-b256-4k d-h128-b128-4k} --page-size 64 \
    --peers fa3 flashmla --runs 30 --no-eager --no-figure --out "$OUT/results") 2>&1 | tee "$OUT/fp8_bench.log" | tail -25
