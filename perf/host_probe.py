"""Where a call's host time goes (issue 21): eager per-call wall time of ours and the peers, and a profile.

For each row (page size 64): the CUDA-graph time of our planned run(), then the eager per-call wall time
(back-to-back calls, no graph, one sync at the end, divided by the calls) of our one-call form, our
plan/run (and both again with every tensor descriptor rebuilt per call, as before v19), FlashInfer fa3's
run() and FlashMLA (decode). Then cProfile of our run() and one-call form on
the first rows, the top functions by own time, into $OUT/host_profile_*.txt.

    python perf/host_probe.py [ROW ...]      (needs CUDA; peers when `.peers/activate.sh` was sourced)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from tuner.bench.flashinfer_mla import FlashInferPeer
from tuner.bench.flashmla import FlashMLAPeer
from tuner.bench.ours import OursFunctional, OursPlanRun
from tuner.harness.inputs import benchmark_set, make_inputs
from tuner.harness.timing import time_call
from tuner.runtime.launch import _Step, _with_base

ROWS = ["d-b1-1k", "d-b32-4k", "d-b128-2k", "d-h128-b32-4k", "p-1x4k", "p-28-fresh"]
CALLS = 300


def per_call_us(fn, calls: int = CALLS) -> tuple[float, float]:
    """(wall, host) µs per call of ``calls`` back-to-back calls (no graph): wall until the final sync, host
    the time to issue them."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t2 - t0) / calls * 1e6, (t1 - t0) / calls * 1e6


def profile(fn, path: Path, calls: int = 200) -> str:
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(35)
    path.write_text(buf.getvalue())
    return buf.getvalue()


def rebuilt_every_call(step: _Step, tensors) -> list:
    """_Step.arguments as it was before descriptors were kept per base (v15-v18): each call rebuilds them."""
    args = step.template.copy()
    for pos, index in step.tensors:
        args[pos] = tensors[index]
    for pos, index in step.descriptors:
        args[pos] = _with_base(args[pos], tensors[index])
    return args


def main(argv: list[str]) -> None:
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = {w.name: w for w in benchmark_set()}
    names = argv or ROWS
    device = torch.device("cuda")
    fa3, flashmla = FlashInferPeer("fa3"), FlashMLAPeer()
    have_fa3 = fa3.unavailable(device, torch.bfloat16) is None
    table = []
    for i, name in enumerate(names):
        w = rows[name]
        inp = make_inputs(w, 64, device=device, seed=i)
        run = OursPlanRun().prepare(w, inp, 64).call
        one = OursFunctional().prepare(w, inp, 64).call
        graph = time_call(run, device=device).median_us
        line = {"row": name, "graph": graph}
        line["run"], line["run_host"] = per_call_us(run)
        line["one"], line["one_host"] = per_call_us(one)
        kept = _Step.arguments  # A/B: every descriptor rebuilt per call (before v19)
        _Step.arguments = rebuilt_every_call
        line["run_rebuild"], line["run_rebuild_host"] = per_call_us(run)
        line["one_rebuild"], line["one_rebuild_host"] = per_call_us(one)
        _Step.arguments = kept
        if have_fa3:
            call = fa3.prepare(w, inp, 64).call
            line["fa3"] = per_call_us(call)[0]
            line["fa3_graph"] = time_call(call, device=device).median_us
        why = flashmla.unavailable(device, torch.bfloat16) or flashmla.not_applicable(w, 64)
        if why:
            print(f"{name}: no FlashMLA ({why})")
        else:
            line["flashmla"] = per_call_us(flashmla.prepare(w, inp, 64).call)[0]
        table.append(line)
        if i < 2 or name.startswith("p-1"):
            profile(run, out / f"host_profile_{name}_run.txt")
            profile(one, out / f"host_profile_{name}_one.txt")
        print(line, flush=True)
    cols = ["graph", "run", "run_host", "run_rebuild", "run_rebuild_host", "one", "one_host", "one_rebuild",
            "one_rebuild_host", "fa3", "fa3_graph", "flashmla"]
    print("\n| row | " + " | ".join(cols) + " |")
    for line in table:
        cells = [f"{line[c]:.1f}" if c in line else "-" for c in cols]
        print(f"| {line['row']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
