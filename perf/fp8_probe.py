"""GPU probe (issue 18): our decode and prefill over an fp8 cache against our bf16 time on the same values,
across a sweep of the fp8 kernels' configs, with the copy floor counted in fp8 bytes.

For each row and page size: ours bf16 (tuned dispatch), ours fp8 with the runtime's config (the dispatch
table's fp8 entry, else the derived or default one), then each config of the sweep (correctness-gated
against the float32 reference over the dequantized cache); prints per row the best fp8 config, its time,
fp8 / bf16 and the fraction of the fp8 copy floor, and writes every timing as JSON lines to
``$OUT/fp8_probe.jsonl``.

    python perf/fp8_probe.py [--quick] [ROW[:PS] ...]      (default: the decode rows at page sizes 1 and 64)

``--quick``: one decode config (64-token tiles, 4 stages below 64 heads per program, 3 at 64; 8 warps) and
two prefill ones.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tuner.harness.check import check
from tuner.harness.floors import floor_us, measure_ceilings
from tuner.harness.inputs import FP8, benchmark_set, make_inputs
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref
from tuner.harness.timing import time_call
from tuner.runtime.config import DecodeConfig, PrefillConfig
from tuner.runtime.decode import mla_decode
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import select
from tuner.runtime.prefill import mla_prefill

ROWS = ["d-b1-1k", "d-b32-4k", "d-b64-8k", "d-b256-4k", "d-b16-32k", "d-h128-b32-4k", "d-h128-b128-4k",
        "p-1x4k", "p-16-var"]


QUICK = False


def decode_sweep(heads: int, page_size: int) -> list[DecodeConfig]:
    """Tiles, stages and warps of the Triton decode stage 1 over an fp8 cache (bulk copies where a tile fits
    in a page)."""
    block_h = 16 if heads <= 16 else (32 if heads <= 32 else 64)
    merge = dict(merge_block_h=min(8, block_h), merge_block_d=512 if heads >= 64 else 128, pdl=1, align=1)
    shapes = ([(32, 3, 8), (32, 4, 8), (64, 2, 8), (64, 3, 8)] if block_h == 64 else
              [(64, 2, 4), (64, 3, 4), (64, 4, 4), (64, 4, 8), (32, 4, 4), (32, 6, 4), (128, 2, 8), (128, 3, 8)])
    if QUICK:
        shapes = [(64, 3, 8)] if block_h == 64 else [(64, 4, 8)]
    configs = [DecodeConfig(block_h=block_h, block_n=n, num_stages=st, num_warps=wp, tma=int(n <= page_size),
                            programs_per_sm=1, split_tokens=64, **merge) for n, st, wp in shapes]
    return configs


def prefill_sweep(heads: int, page_size: int) -> list[PrefillConfig]:
    block_h = min(16, heads)
    shapes = [(4, 64, 2, 8), (4, 64, 3, 8), (8, 64, 2, 8), (4, 32, 4, 4), (8, 32, 3, 8)]
    if QUICK:
        shapes = shapes[1:3]
    return [PrefillConfig(block_m=m, block_h=block_h, block_n=n, num_stages=st, num_warps=wp, tma=int(n <= page_size))
            for m, n, st, wp in shapes]


def caller(w, x, outs, config):
    """A graph-capturable closure of one call of ``w`` on inputs ``x`` with ``config`` (None: the runtime's)."""
    if w.is_decode:
        return lambda: mla_decode(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.kv_indptr, x.kv_indices, x.sm_scale,
                                  x.kv_last_page_len, out=outs[0], lse=outs[1], config=config, **x.scales)
    return lambda: mla_prefill(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.qo_indptr, x.kv_indptr, x.kv_indices,
                               x.sm_scale, x.kv_last_page_len, causal=w.causal, out=outs[0], lse=outs[1],
                               config=config, **x.scales)


def main(argv: list[str]) -> None:
    global QUICK
    QUICK = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "fp8_probe.jsonl").open("w")
    device = torch.device("cuda")
    info = gpu_info(device)
    ceil = measure_ceilings(device, torch.bfloat16, runs=20)
    rows = {w.name: w for w in benchmark_set()}
    todo = []
    for arg in argv or [f"{r}:{ps}" for r in ROWS for ps in (1, 64)]:
        name, _, ps = arg.partition(":")
        todo.append((rows[name], int(ps or 64)))
    table = []
    for w, ps in todo:
        bf = make_inputs(w, ps, torch.bfloat16, device, seed=1)
        f8 = make_inputs(w, ps, torch.bfloat16, device, seed=1, kv_dtype=FP8)
        outs = (torch.empty_like(bf.q_nope), torch.empty(bf.q_nope.shape[:2], device=device))
        if w.is_decode:
            ref = mla_decode_ref(f8.q_nope, f8.q_pe, f8.ckv_cache, f8.kpe_cache, f8.kv_indptr, f8.kv_indices,
                                 f8.sm_scale, f8.kv_last_page_len, **f8.scales)
            sweep = decode_sweep(w.heads, ps)
        else:
            ref = mla_prefill_ref(f8.q_nope, f8.q_pe, f8.ckv_cache, f8.kpe_cache, f8.qo_indptr, f8.kv_indptr,
                                  f8.kv_indices, f8.sm_scale, f8.kv_last_page_len, causal=w.causal, **f8.scales)
            sweep = prefill_sweep(w.heads, ps)

        def call(x, config=None, w=w, outs=outs):
            return caller(w, x, outs, config)
        spec8 = replace(w.spec(ps), fp8=True)
        runtime_config, source, _ = select(spec8, w.total_q, w.avg_kv_len, info)
        t_bf = time_call(call(bf), device=device).median_us
        t_rt = time_call(call(f8), device=device).median_us
        floor8 = floor_us(w.bytes_moved(2, 1), w.flops(), ceil.copy_bytes_per_s, ceil.matmul_flops_per_s)
        best = (t_rt, runtime_config)
        for config in sweep:
            try:
                config.check_spec(spec8)
                call(f8, config)()
                torch.cuda.synchronize()
                verdict = check(outs[0], outs[1], *ref)
                if not verdict.passed:
                    log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(),
                                          "fail": verdict.reason}) + "\n")
                    continue
                t = time_call(call(f8, config), device=device, runs=30).median_us
            except Exception as err:  # noqa: BLE001 - a config that does not compile or fit: log, go on
                log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(),
                                      "error": f"{type(err).__name__}: {str(err)[:200]}"}) + "\n")
                continue
            log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(), "us": t}) + "\n")
            if t < best[0]:
                best = (t, config)
        t_best = time_call(call(f8, best[1]), device=device).median_us
        line = dict(row=w.name, ps=ps, bf16=t_bf, fp8_runtime=t_rt, fp8_best=t_best, source=source,
                    ratio=t_best / t_bf, floor8=floor8 / t_best, best=best[1].short())
        log.write(json.dumps(line) + "\n")
        log.flush()
        print(line, flush=True)
        table.append(line)
    print("\n| row | ps | ours bf16 µs | fp8 runtime config µs | fp8 best µs | best / bf16 | fp8 floor fraction "
          "| best config |")
    for r in table:
        print(f"| {r['row']} | {r['ps']} | {r['bf16']:.1f} | {r['fp8_runtime']:.1f} | {r['fp8_best']:.1f} | "
              f"{r['ratio']:.2f} | {r['floor8']:.0%} | {r['best']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
