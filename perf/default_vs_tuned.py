"""GPU probe: how good are the configs the runtime derives for untuned shapes, and does transfer tuning tune as
well as tuning from scratch?

Run on the GPU machine (about 2-3 minutes each; the arguments narrow the set):

    python perf/default_vs_tuned.py [--hold-out kernel|entry] [--variant decode prefill_causal]
                                    [--heads 16 128] [--page-size 1 64] [--buckets NAME...] [--runs 40]
    python perf/default_vs_tuned.py --transfer-check [--cases decode:64:16:b17-96_kv2k+ ...] [--trials 48]

Default mode: for each (kernel, bucket) of decode and causal prefill with a fresh entry in this GPU's table,
the tuned config against the config :mod:`tuner.runtime.derive` makes for it when the entry is withheld
(``--hold-out kernel``, the default: the kernel's whole row, so it derives from other head counts and page
sizes, as an untuned shape does; ``entry``: that entry only, so the kernel's other buckets are nearest),
and the default config, on the bucket's representative batch: the same Bench as the tuner (correctness gate
against the float32 reference, then CUDA-graph replay with L2 flushed, median of ``--runs``; each config
timed twice, ABAB, and the two medians averaged). The configs compile first, in parallel. Prints one row a
pair (µs and the ratios to the tuned time), the geometric means and the worst derived/tuned ratio.

``--transfer-check``: for a few (kernel, bucket) the committed table has no entry for, ``mla-tune tune`` twice
in subprocesses, each with a journal and a table folder of its own: from scratch (``--seeds 0 --patience 0``,
the whole ``--trials`` budget) and with transfer (the defaults: seeds from the committed table's neighbours,
early stop); then both winners re-timed here side by side. Prints each run's trials, wall time and whether
it stopped early, and transfer/scratch of the re-timed winners. Development tool for perf/LOG.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tuner.runtime import derive, dispatch
from tuner.runtime.buckets import by_name
from tuner.runtime.device import gpu_info
from tuner.runtime.spec import MLASpec
from tuner.tuning import representative
from tuner.tuning.measure import Bench
from tuner.tuning.precompile import CompilePool, capture, current_target, default_workers
from tuner.tuning.space import compact

ROOT = Path(__file__).resolve().parents[1]
TRANSFER_CASES = ("decode:64:16:b17-96_kv2k+", "decode:32:32:b1-16_kv1-2k", "prefill_causal:64:16:q257-2k")
"""variant:heads:page size:bucket, none of them in the committed H200 table."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transfer-check", action="store_true")
    p.add_argument("--hold-out", choices=("kernel", "entry"), default="kernel")
    p.add_argument("--variant", nargs="+", default=["decode", "prefill_causal"])
    p.add_argument("--heads", type=int, nargs="+")
    p.add_argument("--page-size", type=int, nargs="+")
    p.add_argument("--buckets", nargs="+")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--max-seconds", type=float, default=170.0, help="stop timing new pairs after this long")
    p.add_argument("--cases", nargs="+", default=list(TRANSFER_CASES))
    p.add_argument("--trials", type=int, default=48)
    return p.parse_args(argv)


def timed(bench: Bench, configs: list, runs: int) -> list[float | None]:
    """Median µs of each config (None: failed the gate), each timed twice in ABAB order, medians averaged."""
    wrong = [bench.check(c) for c in configs]
    for c, why in zip(configs, wrong, strict=True):
        if why is not None:
            print(f"  WRONG {compact(c)}: {why}")
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(2):
        for i, c in enumerate(configs):
            if wrong[i] is None:
                times[i].append(bench.time(c, runs=runs, warmup=3).median_us)
    return [sum(t) / len(t) if t else None for t in times]


def compile_all(pairs: list[tuple[MLASpec, str, list]], device: torch.device) -> None:
    """Fill Triton's cache with every config of every pair, in parallel (the tuner's compile pool)."""
    pool = CompilePool(default_workers(), current_target())
    futures = []
    try:
        for spec, bucket, configs in pairs:
            bench = Bench(spec, representative.workload(by_name(kind(spec), bucket), spec), device, gate=False)
            futures += [pool.submit(capture(spec, bench.launcher(c))) for c in configs]
            del bench
        for f in futures:
            f.result(timeout=900)
    finally:
        pool.close()


def kind(spec: MLASpec) -> str:
    return "decode" if spec.is_decode else "prefill"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.3f}"


def _us(x: float | None) -> str:
    return "WRONG" if x is None else f"{x:.1f}"


def build_pairs(table: dispatch.Table, gpu, args: argparse.Namespace) -> list:
    """(spec, bucket, [tuned, derived, default], where the derived one came from) of each fresh entry."""
    pairs = []
    for kernel, entries in sorted(table.kernels.items()):
        spec = MLASpec.from_name(kernel)
        if spec.variant not in args.variant or (args.heads and spec.num_heads not in args.heads) or \
                (args.page_size and spec.page_size not in args.page_size):
            continue
        for bucket, entry in sorted(entries.items()):
            if (args.buckets and bucket not in args.buckets) or not derive.fresh(spec, entry):
                continue
            b = by_name(kind(spec), bucket)
            held = {k: ({n: e for n, e in es.items() if n != bucket} if args.hold_out == "entry" else {})
                    if k == kernel else es for k, es in table.kernels.items()}
            found = derive.derive(spec, b, [dispatch.Table(table.gpu, held, table.path)], gpu, derive.fresh)
            w = representative.workload(b, spec)
            default = dispatch.untuned_config(spec, w.total_q, w.avg_kv_len, gpu)
            derived, source = found if found is not None else (default, "default")
            pairs.append((spec, bucket, [entry.config, derived, default], source))
    return pairs


def default_vs_tuned(args: argparse.Namespace) -> int:
    device = torch.device("cuda")
    gpu = gpu_info(device)
    pairs = build_pairs(dispatch.load_table(dispatch.table_path(gpu.key)), gpu, args)
    print(f"{len(pairs)} tuned (kernel, bucket) on {gpu.describe()}; hold-out: {args.hold_out}; compiling ...")
    started = time.monotonic()
    compile_all([(s, b, c) for s, b, c, _ in pairs], device)
    print(f"compiled in {time.monotonic() - started:.0f} s")
    header = f"{'kernel':<46} {'bucket':<14} {'tuned us':>9} {'derived us':>10} {'default us':>10} " \
             f"{'der/tuned':>9} {'def/tuned':>9}  derived from"
    print(header)
    ratios: list[tuple[float, str]] = []
    default_ratios: list[float] = []
    for spec, bucket, configs, source in pairs:
        if time.monotonic() - started > args.max_seconds:
            print(f"(stopped after {args.max_seconds:.0f} s: narrow the set to see the rest)")
            break
        bench = Bench(spec, representative.workload(by_name(kind(spec), bucket), spec), device)
        distinct = list(dict.fromkeys(configs))
        got = dict(zip(distinct, timed(bench, distinct, args.runs), strict=True))
        tuned, der, dflt = (got[c] for c in configs)
        print(f"{spec.name():<46} {bucket:<14} {_us(tuned):>9} {_us(der):>10} {_us(dflt):>10} "
              f"{_ratio(der, tuned):>9} {_ratio(dflt, tuned):>9}  {source}", flush=True)
        if tuned is not None and der is not None:
            ratios.append((der / tuned, f"{spec.name()} {bucket}"))
        if tuned is not None and dflt is not None:
            default_ratios.append(dflt / tuned)
        del bench
        torch.cuda.empty_cache()
    if ratios:
        gmean = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
        worst = max(ratios)
        dmean = math.exp(sum(math.log(r) for r in default_ratios) / max(1, len(default_ratios)))
        print(f"derived/tuned: geometric mean {gmean:.3f}, worst {worst[0]:.3f} ({worst[1]}); "
              f"default/tuned: geometric mean {dmean:.3f}, worst {max(default_ratios, default=math.nan):.3f}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def _tune(case: tuple[str, int, int, str], folder: Path, extra: list[str]) -> tuple[float, str]:
    variant, heads, page_size, bucket = case
    argv = [sys.executable, "-m", "tuner", "tune", "--variant", variant, "--heads", str(heads), "--page-size",
            str(page_size), "--buckets", bucket, "--out", str(folder), "--storage", f"journal:{folder}/studies.journal",
            *extra]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.monotonic() - started
    lines = [line for line in proc.stdout.replace("\r", "\n").splitlines() if re.match(r"^\[\d+/\d+\]", line)]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:] + proc.stderr[-2000:])
    return seconds, lines[-1] if lines else "(no result)"


def transfer_check(args: argparse.Namespace) -> int:
    device = torch.device("cuda")
    gpu = gpu_info(device)
    cases = []
    for text in args.cases:
        variant, heads, page_size, bucket = text.split(":")
        cases.append((variant, int(heads), int(page_size), bucket))
    print(f"transfer check on {gpu.describe()}: {len(cases)} cases, scratch = --seeds 0 --patience 0 --trials "
          f"{args.trials}, transfer = the defaults")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mla-transfer-") as tmp:
        for case in cases:
            spec = MLASpec(case[0], case[1], 512, 64, case[2])  # type: ignore[arg-type]
            configs = []
            for mode, extra in (("scratch", ["--seeds", "0", "--patience", "0"]), ("transfer", [])):
                folder = Path(tmp) / f"{spec.name()}-{case[3]}-{mode}"
                seconds, line = _tune(case, folder, ["--trials", str(args.trials), *extra])
                print(f"{mode:<8} {seconds:5.0f} s  {line}", flush=True)
                e = dispatch.load_table(dispatch.table_path(gpu.key, folder)).entry(spec.name(), case[3]) \
                    if dispatch.table_path(gpu.key, folder).is_file() else None
                configs.append(e.config if e is not None else None)
            if None in configs:
                continue
            bench = Bench(spec, representative.workload(by_name(kind(spec), case[3]), spec), device)
            scratch_us, transfer_us = timed(bench, configs, args.runs) if configs[0] != configs[1] else \
                [timed(bench, configs[:1], args.runs)[0]] * 2
            rows.append((f"{spec.name()} {case[3]}", scratch_us, transfer_us))
            del bench
            torch.cuda.empty_cache()
    print(f"{'case':<62} {'scratch us':>10} {'transfer us':>11} {'transfer/scratch':>16}")
    for label, a, b in rows:
        print(f"{label:<62} {_us(a):>10} {_us(b):>11} {_ratio(b, a):>16}")
    return 0


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    return transfer_check(args) if args.transfer_check else default_vs_tuned(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
