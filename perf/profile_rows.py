"""Profile our kernels on benchmark rows under Nsight Compute (what limits each row).

Run on the GPU machine (one call of the tuned dispatch per row, inside a profiler range):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --csv --page details \
        python perf/profile_rows.py d-b256-4k:64 p-1x4k:64 > $OUT/ncu.csv

Arguments: ROW:PAGE_SIZE of docs/benchmark_set.md. Without ncu it just runs them.
Development tool for the performance log (perf/LOG.md).
"""

from __future__ import annotations

import sys

import torch

from tuner import MLADecode, MLAPrefill
from tuner.harness.inputs import benchmark_set, make_inputs


def main(argv: list[str]) -> None:
    rows = {w.name: w for w in benchmark_set()}
    for arg in argv:
        name, _, ps = arg.partition(":")
        w, page_size = rows[name], int(ps or 1)
        inp = make_inputs(w, page_size, torch.bfloat16, torch.device("cuda"), seed=0)
        shape = dict(num_heads=w.heads, page_size=page_size, sm_scale=inp.sm_scale,
                     head_dim_ckv=w.head_dim_ckv, head_dim_kpe=w.head_dim_kpe, num_pages=inp.ckv_cache.shape[0])
        if inp.qo_indptr is None:
            plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, **shape)
        else:
            plan = MLAPrefill().plan(inp.qo_indptr, inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len,
                                     causal=w.causal, **shape)
        for _ in range(3):  # compile and warm up outside the profiled range
            plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache)
        torch.cuda.synchronize()
        print(f"# {arg}: {plan.spec.name()} {plan.config.short()}", file=sys.stderr)
        torch.cuda.profiler.start()
        plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del inp, plan
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
