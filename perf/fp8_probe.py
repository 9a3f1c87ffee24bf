"""GPU probe (issue 18): our decode and prefill over an fp8 cache against our bf16 time on the same values,
across a sweep of the fp8 kernels' configs, with the copy floor counted in fp8 bytes.

For each row and page size, through the tuner's ``Bench`` (its inputs, its correctness gate against the
float32 reference over the dequantized cache, its CUDA-graph timing and floor): ours bf16 (tuned dispatch),
ours fp8 with the runtime's config (the dispatch table's fp8 entry, else the derived or default one), then
each config of the sweep (gated); prints per row the best fp8 config, its time,
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

from tuner.harness.floors import measure_ceilings
from tuner.harness.inputs import benchmark_set
from tuner.runtime.config import DecodeConfig, PrefillConfig
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import select
from tuner.tuning.measure import Bench

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
        # the tuner's bench: the same gate (float32 reference over the dequantized cache), CUDA-graph timing
        spec16, spec8 = w.spec(ps), replace(w.spec(ps), fp8=True)
        bf, f8 = Bench(spec16, w, device, gate=False), Bench(spec8, w, device)
        sweep = decode_sweep(w.heads, ps) if w.is_decode else prefill_sweep(w.heads, ps)
        runtime_config, source, _ = select(spec8, w.total_q, w.avg_kv_len, info)
        t_bf = bf.time(select(spec16, w.total_q, w.avg_kv_len, info)[0], runs=100).median_us
        t_rt = f8.time(runtime_config, runs=100).median_us
        best = (t_rt, runtime_config)
        for config in sweep:
            try:
                config.check_spec(spec8)
                reason = f8.check(config)
                if reason is not None:
                    log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(), "fail": reason}) + "\n")
                    continue
                t = f8.time(config, runs=30).median_us
            except Exception as err:  # noqa: BLE001 - a config that does not compile or fit: log, go on
                log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(),
                                      "error": f"{type(err).__name__}: {str(err)[:200]}"}) + "\n")
                continue
            log.write(json.dumps({"row": w.name, "ps": ps, "config": config.to_dict(), "us": t}) + "\n")
            if t < best[0]:
                best = (t, config)
        t_best = f8.time(best[1], runs=100).median_us
        line = dict(row=w.name, ps=ps, bf16=t_bf, fp8_runtime=t_rt, fp8_best=t_best, source=source,
                    ratio=t_best / t_bf, floor8=f8.floor_us(ceil) / t_best, best=best[1].short())
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
