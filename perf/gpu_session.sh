#!/usr/bin/env bash
# The GPU-machine runs behind the closing notes, as phases: bash perf/gpu_session.sh PHASE... (logs in $OUT).
#   tests   the GPU test suite (bf16, every catalogue configuration, graph replay, > 2^31-element cache)
#   wstests the GPU tests of the warp-specialized kernels and every catalogue spec's default
#   narrow  the GPU decode tests below 64 heads (the swapped-product ws kernel), all shapes
#   gather  perf/probe.py's page-size-1 comparison of the ws kernels (gathering loader) with the Triton kernels
#   stages  perf/stage_probe.py: the launch floor, then each decode row's whole call, stage 1 alone, stage 2 alone (tuned dispatch)
#   ab      stages of the modules and table in OLD (default build/old_src/generated, e.g. `git archive HEAD generated`)
#           and then of these modules with the same table entries (STALE_OK=1): a kernel change before its re-tune
#   abbench the benchmark set with the same table entries, the modules in OLD (default build/old/generated) against
#           these, alternating ROUNDS times (default 2): perf/ab_bench.py, no peers; a module change before its re-tune
#   align   perf/stage_probe.py align: the tuned num_programs against multiples / divisors of the batch
#   merge   perf/stage_probe.py merge: stage 2 as an ordinary and a programmatic dependent launch, every merge tile
#   smoke   a 3-trial tune of one decode bucket (into $OUT/smoke, not generated/)
#   tune    `mla-tune tune` (the default catalogue; VARIANTS, e.g. "decode", HEADS, BUCKETS narrow it, TRIALS sets
#           the trials per bucket) on GPU 0, timed; the table is copied to $OUT
#   catalogue  `mla-tune tune --catalogue` (every decode and causal-prefill module) for what is left of LIMIT minus
#           RESERVE s (default 60), journal and table in build/tune-catalogue (carry it to resume in the next call),
#           both copied to $OUT; the wall time is printed; CAT_ARGS adds flags (e.g. --min-trials 6 --patience 4;
#           --missing: only the buckets the table lacks: the table starts as a copy of the committed one)
#   defaults perf/default_vs_tuned.py on the buckets whose default config changed in the 12th session without a
#           measurement (64 and 128 heads, up to 16 requests; DEF_ARGS replaces the selection)
#   h128    decode at 128 heads (DeepSeek-V3 on one GPU), 24 trials per bucket, into the same table (PAGE_SIZES, default "1 64")
#   cmp     TPE (the default 48 trials; the study of `tune` when it ran first) against an exhaustive sweep of one decode bucket
#   tune2   the default catalogue again on 2 GPUs (--workers 2, fresh journal), timed
#   bench   `mla-tune bench` with the peers (needs .peers carried)
#   mtpbench `mla-tune bench --set mtp` beside fa3 and FlashMLA (needs .peers carried), into $OUT/mtp
#   offbench `mla-tune bench --set off` (the off-table rows, each at its own page size) likewise, into $OUT/off
#   host    perf/host_probe.py: eager per-call wall and host time of ours and the peers, cProfile of run() (ROWS)
# Needs wheels the machine lacks (optuna and its needs) in .whl/ and PY (default python3).
set -uo pipefail
T0=$(date +%s)
LIMIT=${LIMIT:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! python3 -c "import optuna" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLA_TUNER_CACHE_DIR="$PWD/build/mla-cache"
left() { echo $((LIMIT - ($(date +%s) - T0))); }
# every decode row of the benchmark set at page sizes 1 and 64 (the default ROWS of stages and ab)
DECODE_ROWS="$(for r in d-b1-1k d-b32-4k d-b64-8k d-b128-2k d-b256-4k d-b16-32k d-b64-skew d-h128-b32-4k d-h128-b128-4k; do echo $r:1 $r:64; done)"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

for phase in "$@"; do
    echo "=== $phase (t=$(($(date +%s) - T0)) s, $(left) s left)"
    case $phase in
    tests) timeout 240 python3 -m pytest tests/gpu -n 8 -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    wstests) timeout 300 python3 -m pytest tests/gpu -n 8 -q -p no:cacheprovider -k "warp_specialized or catalogue" \
                 2>&1 | tee "$OUT/ws_tests.log" | tail -15 ;;
    narrow) timeout 150 python3 -m pytest tests/gpu -n 8 -q -p no:cacheprovider \
                -k "test_gpu_decode and not h128 and not h64" 2>&1 | tee "$OUT/narrow_tests.log" | tail -3 ;;
    gather) (source .peers/activate.sh && timeout "$(left)" python3 perf/probe.py all gather) 2>&1 \
                | tee "$OUT/gather_probe.log" | grep -v "  check" ;;
    stages) timeout "$(left)" python3 perf/stage_probe.py ${ROWS:-$DECODE_ROWS} \
                2>&1 | tee "$OUT/stage_probe.log" ;;
    ab) for side in before after; do  # stages of the committed modules and table (OLD, e.g. from git archive) vs these
            if [ $side = before ]; then env="MLA_TUNER_GENERATED_DIR=${OLD:-$PWD/build/old_src/generated}"; else env="STALE_OK=1"; fi
            env $env timeout "$(left)" python3 perf/stage_probe.py ${ROWS:-$DECODE_ROWS} \
                2>&1 | tee "$OUT/ab_$side.log"
        done ;;
    abbench) for round in $(seq ${ROUNDS:-2}); do for side in old new; do
                if [ $side = old ]; then env="MLA_TUNER_GENERATED_DIR=${OLD:-$PWD/build/old/generated}"; else env="AB=new"; fi
                env $env timeout "$(left)" python3 perf/ab_bench.py --peers fa3 --no-figure --out "/tmp/ab_${side}_$round" \
                    2>&1 | tee "$OUT/abbench_${side}_$round.log" | grep -v "^  "
            done; done ;;
    align) timeout "$(left)" python3 perf/stage_probe.py align ${ROWS:-$(for r in d-b1-1k d-b32-4k d-b64-8k d-b128-2k d-b256-4k d-b16-32k d-h128-b32-4k d-h128-b128-4k; do echo $r:1 $r:64; done)} \
                2>&1 | tee "$OUT/align_probe.log" ;;
    merge) timeout "$(left)" python3 perf/stage_probe.py merge ${ROWS:-d-b1-1k:1 d-b1-1k:64 d-b32-4k:64 d-b128-2k:64 \
                d-b256-4k:64 d-b256-4k:1 d-b64-skew:64 d-b16-32k:64 d-h128-b32-4k:64 d-h128-b128-4k:64 d-h128-b128-4k:1} \
                2>&1 | tee "$OUT/merge_probe.log" ;;
    smoke) timeout 180 python3 -m tuner tune --trials 3 --variant decode --page-size 1 --buckets b1-16_kv1-2k \
               --out "$OUT/smoke" 2>&1 | tee "$OUT/smoke.log" | grep -v "trials:" || exit 1 ;;
    tune) CUDA_VISIBLE_DEVICES=0 /usr/bin/time -f "tune wall %e s" timeout "$(left)" python3 -m tuner tune \
              ${VARIANTS:+--variant $VARIANTS} ${HEADS:+--heads $HEADS} ${BUCKETS:+--buckets $BUCKETS} ${TRIALS:+--trials $TRIALS} \
              2>&1 | tee "$OUT/tune.log" | grep -v "trials:"; cp generated/dispatch/*.json "$OUT/" ;;
    catalogue) mkdir -p build/tune-catalogue/dispatch
              ls build/tune-catalogue/dispatch/*.json >/dev/null 2>&1 || cp generated/dispatch/*.json build/tune-catalogue/dispatch/
              minutes=$(python3 -c "print(max(0.5, ($(left) - ${RESERVE:-60}) / 60))")
              /usr/bin/time -f "catalogue wall %e s" timeout "$(( $(left) - 15 ))" python3 -m tuner tune --catalogue \
                  --minutes "$minutes" ${CAT_ARGS:-} --storage "journal:$PWD/build/tune-catalogue/studies.journal" \
                  --out build/tune-catalogue/dispatch 2>&1 | tee -a "$OUT/catalogue.log" | grep -v "trials:"
              cp build/tune-catalogue/studies.journal build/tune-catalogue/dispatch/*.json "$OUT/" ;;
    defaults) timeout "$(left)" python3 perf/default_vs_tuned.py ${DEF_ARGS:---variant decode --heads 64 128 \
                  --buckets b1-16_kv1-2k b1-16_kv2k+} 2>&1 | tee "$OUT/defaults.log" | tail -40 ;;
    h128) timeout "$(left)" python3 -m tuner tune --heads 128 --variant decode --trials 24 --page-size ${PAGE_SIZES:-1 64} 2>&1 | tee "$OUT/h128.log" \
              | grep -v "trials:"; cp generated/dispatch/*.json "$OUT/" ;;
    cmp) timeout 200 python3 -m tuner tune --variant decode --page-size 64 --buckets b17-96_kv2k+ \
             --out "$OUT/cmp" 2>&1 | grep -v "trials:" | tee "$OUT/cmp.log"
         timeout "$(left)" python3 -m tuner tune --variant decode --page-size 64 --buckets b17-96_kv2k+ --exhaustive \
             --runs 10 --out "$OUT/cmp" 2>&1 | grep -v "trials:" | tee -a "$OUT/cmp.log" ;;
    tune2) MLA_TUNER_CACHE_DIR="$PWD/build/mla-cache-2gpu" /usr/bin/time -f "tune2 wall %e s" timeout "$(left)" \
               python3 -m tuner tune --workers 2 --out "$OUT/two" 2>&1 | tee "$OUT/tune2.log" | grep -v "trials:" ;;
    host) (source .peers/activate.sh && timeout "$(left)" python3 perf/host_probe.py ${HOST_ROWS:-}) 2>&1 \
              | tee "$OUT/host_probe.log" ;;
    mtpbench) (source .peers/activate.sh && timeout "$(left)" python3 -m tuner bench --set mtp --peers fa3 flashmla \
                  --no-figure --out "$OUT/mtp") 2>&1 | tee "$OUT/mtp_bench.log" | grep -v "^  check" ;;
    offbench) (source .peers/activate.sh && timeout "$(left)" python3 -m tuner bench --set off --peers fa3 flashmla \
                  --no-figure --out "$OUT/off") 2>&1 | tee "$OUT/off_bench.log" | grep -v "^  check" ;;
    bench) (source .peers/activate.sh && timeout "$(left)" python3 -m tuner bench --out "$OUT/results") 2>&1 \
               | tee "$OUT/bench.log" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
    esac
done
echo "=== done at t=$(($(date +%s) - T0)) s"
