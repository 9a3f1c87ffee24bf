"""GPU probe: the warp-specialized decode stage 1 (ws=1) against the Triton stage 1 and fa3, page size 64.

Run on the GPU machine: source .peers/activate.sh; python perf/ws_probe.py   (perf/LOG.md, "v5")
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from probe import check, fi_wrapper  # noqa: E402

import tuner  # noqa: E402
from tuner.harness.inputs import Workload, benchmark_set, make_inputs  # noqa: E402
from tuner.harness.reference import mla_decode_ref  # noqa: E402
from tuner.harness.timing import time_call  # noqa: E402
from tuner.runtime.config import DecodeConfig  # noqa: E402

DEV = torch.device("cuda")
TRITON = DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=3, tma=1, merge_block_h=4)
WS = [(64, 2, 1), (64, 1, 1), (32, 4, 1), (32, 3, 1), (64, 2, 2)]  # block_n, num_stages, programs_per_sm


def main() -> None:
    rows = [w for w in benchmark_set() if w.is_decode and w.heads == 128]
    rows += [Workload("d-h64-b64-4k", 64, (4096,) * 64), Workload("d-h128-b4-16k", 128, (16384,) * 4)]
    for w in rows:
        ps = 64
        inp = make_inputs(w, ps, torch.bfloat16, DEV, seed=0)
        sub = slice(0, min(8, w.batch))
        ro, rl = mla_decode_ref(inp.q_nope[sub], inp.q_pe[sub], inp.ckv_cache, inp.kpe_cache,
                                inp.kv_indptr[: sub.stop + 1], inp.kv_indices, inp.sm_scale, inp.kv_last_page_len[sub])
        args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices, inp.sm_scale,
                inp.kv_last_page_len)
        fa = fi_wrapper(inp, w, ps, False)
        fa_us = time_call(fa, runs=40).median_us if fa else float("nan")
        for name, cfg in [("triton", TRITON)] + [
                (f"ws n{n} st{st} p{pp}", DecodeConfig(block_h=64, block_n=n, num_stages=st, programs_per_sm=pp, tma=1,
                                                       ws=1, merge_block_h=4)) for n, st, pp in WS]:
            o, lse = tuner.mla_decode(*args, config=cfg)
            torch.cuda.synchronize()
            ok = check(o[sub], lse[sub], ro, rl, f"{w.name} {name}")
            t = time_call(lambda: tuner.mla_decode(*args, config=cfg), runs=40).median_us  # noqa: B023
            print(f"{w.name:16s} ps{ps} {name:18s} {t:8.1f} us  fa3 {fa_us:7.1f}  ratio {t / fa_us:5.2f} "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
        del inp
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
