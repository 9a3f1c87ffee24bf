"""Time the tuned kernels against the peers on the benchmark set (docs/benchmark_set.md).

Every row runs at page sizes 1 and 64 (an off-table row only at its own page size) with our kernels
(no explicit config: the dispatch table decides) beside every peer that imports: FlashInfer's MLA
wrapper (fa3, fa2), FlashMLA (page size 64: decode and speculative-decoding rows), SGLang's Triton
decode kernel (decode rows) and a plain PyTorch implementation. Each output is checked against the
float32 reference before it is timed: CUDA-graph replay of one call, and on CUDA also the eager
per-call time of back-to-back calls without a graph (a second table). Prints the tables and writes
bench.json, bench.csv and bench.png into OUT/<gpu-key>/ (default OUT: the checkout's results/).

Without CUDA, or with --dry-run, the same pipeline runs under the Triton interpreter on tiny shapes
(fp16) with the PyTorch peer only, writing into a temporary folder unless --out: its timings mean
nothing about GPU speed. The peers are optional (docs/peers.md says how to install them); those that
do not import are listed as skipped.

Examples:
  mla-tune bench                                   # every row, page sizes 1 and 64, all peers present
  mla-tune bench --set public                      # the 13 rows of the README's table only
  mla-tune bench --rows d-b1-1k p-1x4k mtp2-h16-b64-4k --page-size 64
  mla-tune bench --heads 16 --batch 64 --kv-len 8192           # a shape of your own (decode)
  mla-tune bench --kv-dtype both --set public --page-size 1 64  # every row over a bf16 and an fp8 cache
  mla-tune bench --compare results/nvidia-h200/bench.json      # exit 1 if our times moved > 5%
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PEERS = ("fa3", "fa2", "flashmla", "sglang", "torch")  # tuner.bench.peers.PEER_KEYS (literal: nothing heavy at import)
SETS = ("public", "mtp", "off", "all")  # tuner.bench.rows.SETS
LAYOUTS = ("auto", "split", "fused")  # tuner.bench.run.CACHE_LAYOUTS
KV_CHOICES = {"bf16": ("bf16",), "fp8": ("fp8",), "both": ("bf16", "fp8")}  # --kv-dtype: tuner.bench.run.KV_DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to run")
    what.add_argument("--set", choices=SETS, default="all", dest="row_set",
                      help="which rows of docs/benchmark_set.md: public (the 13 decode and prefill rows of "
                           "the README's table: 2 minutes on an H200 on 2026-12-03 with fa3, fa2, SGLang and "
                           "PyTorch, 52 s of it FlashInfer's first-use JIT, before FlashMLA and the eager "
                           "timing, which we estimate at half a minute more), mtp (the 3 speculative-"
                           "decoding rows), off (the 7 off-table rows, each at its own page size), all "
                           "(default). How long mtp and off take is unknown: not run yet (our kernels compile "
                           "for each new heads / page size / variant, FlashInfer may JIT again)")
    what.add_argument("--rows", nargs="+", metavar="ID",
                      help="rows by id among those of --set, e.g. d-b1-1k p-1x4k mtp2-h16-b64-4k "
                           "(default: all of the set)")
    what.add_argument("--heads", type=int, help="a shape of your own: query heads (with --batch, --kv-len)")
    what.add_argument("--batch", type=int, help="a shape of your own: sequences")
    what.add_argument("--kv-len", type=int, help="a shape of your own: KV tokens per sequence")
    what.add_argument("--q-len", type=int, help="a shape of your own: causal prefill of Q queries per "
                                                "sequence (default: decode)")
    what.add_argument("--page-size", type=int, nargs="+", metavar="PS",
                      help="page sizes (default: 1 64); an off-table row runs at its own page size only")
    what.add_argument("--kv-dtype", choices=KV_CHOICES,
                      help="the KV cache: bf16 (default: the query dtype, as before), fp8 (float8_e4m3fn "
                           "quantized from the same values with per-tensor scales; ours, FlashInfer fa3, "
                           "FlashMLA and PyTorch run, the others are n/a) or both (each row over bf16, then "
                           "over fp8, with ours' bf16 time beside its fp8 one). --compare: that file's")
    what.add_argument("--peers", nargs="+", choices=PEERS, metavar="PEER",
                      help=f"peers to run, of {' '.join(PEERS)} (default: all that import; dry run: torch)")
    how = p.add_argument_group("how")
    how.add_argument("--runs", type=int,
                     help="timed runs per implementation and row (default: 40; dry run: 2)")
    how.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default: 5)")
    how.add_argument("--check-seqs", type=int, default=32, metavar="N",
                     help="check the first N sequences of each row against the reference "
                          "(0: all; default 32)")
    how.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    how.add_argument("--cache-layout", choices=LAYOUTS,
                     help="auto (default): at page size 64 one [pages, 64, 576] cache that every "
                          "implementation reads (ours and FlashInfer through its two column views), two "
                          "tensors elsewhere; split: two tensors everywhere (FlashMLA and SGLang read a "
                          "concatenated copy; what results written before this option used); fused: one "
                          "cache everywhere. --compare: that file's layout")
    how.add_argument("--no-eager", action="store_true",
                     help="skip the eager per-call timing (N back-to-back calls, no graph; CUDA only)")
    how.add_argument("--dry-run", action="store_true",
                     help="Triton interpreter on the CPU, tiny shapes, PyTorch peer only "
                          "(timings mean nothing)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="write into DIR/<gpu-key>/ (default: the checkout's "
                                                  "results/; dry run and --compare: a temporary folder)")
    out.add_argument("--no-figure", action="store_true", help="do not draw bench.png")
    out.add_argument("--compare", metavar="FILE", help="rerun the rows of a committed bench.json (those of "
                                                       "--set, or --rows) and report each one's deviation "
                                                       "from it")
    out.add_argument("--tolerance", type=float, default=0.05,
                     help="--compare: allowed relative deviation of our times (default: 0.05)")


def _custom_shape(args: argparse.Namespace) -> tuple[int, int, int, int | None] | None:
    given = {"--heads": args.heads, "--batch": args.batch, "--kv-len": args.kv_len}
    if all(v is None for v in given.values()) and args.q_len is None:
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"a shape of your own needs --heads, --batch and --kv-len; "
                         f"missing {' '.join(missing)}")
    if args.rows:
        raise ValueError("--rows and a shape of your own (--heads/--batch/--kv-len) exclude each other")
    return args.heads, args.batch, args.kv_len, args.q_len


def _restart_interpreted() -> None:
    """Run this command again in a process that starts with TRITON_INTERPRET=1: Triton's own jit helpers
    (tl.max, tl.sum, ...) are made for compiled kernels when triton is imported, which importing tuner
    already did, so setting the variable now would be too late for the kernels."""
    os.environ["TRITON_INTERPRET"] = "1"
    if sys.argv[1:2] != ["bench"]:  # called from Python with arguments of its own: nothing to re-run
        raise RuntimeError("mla-tune bench: a dry run needs TRITON_INTERPRET=1 set before Python starts "
                           "(Triton's helpers are made for compiled kernels when it is imported)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "tuner", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    import torch

    dry_run = bool(args.dry_run)
    if not dry_run and not torch.cuda.is_available():
        dry_run = True
        print("no CUDA device: this is a dry run (Triton interpreter, tiny shapes, timings mean nothing)")
    if dry_run:
        from tuner.runtime.device import interpreting

        if not interpreting():
            _restart_interpreted()

    from tuner.runtime import paths

    from . import report as bench_report
    from . import rows as bench_rows
    from . import run as bench_run

    try:
        old = bench_report.load_results(Path(args.compare)) if args.compare else None
        if old is not None and old["dry_run"] != dry_run:
            raise ValueError(f"compare: {args.compare} is {'a dry run' if old['dry_run'] else 'a GPU run'}; "
                             f"this is {'a dry run' if dry_run else 'a GPU run'}")
        shape = _custom_shape(args)
        if shape is not None:
            rows = [bench_rows.custom_workload(*shape)]
        elif old is not None and not args.rows:
            rows = bench_rows.rows_of(old)
            if args.row_set != "all":  # the file's rows of that set only
                in_set = bench_rows.known_rows(dry_run, args.row_set)
                rows = [w for w in rows if w.name in in_set]
        else:
            rows = bench_rows.select_rows(args.rows, dry_run, args.row_set)
        layout = args.cache_layout or (bench_report.cache_layout(old) if old else "auto")
        kv_dtypes = KV_CHOICES[args.kv_dtype] if args.kv_dtype else tuple(bench_report.kv_dtypes(old) if old
                                                                           else KV_CHOICES["bf16"])
        page_sizes = args.page_size or (old["settings"]["page_sizes"] if old else [1, 64])
        for ps in page_sizes:
            if ps < 1 or ps & (ps - 1):
                raise ValueError(f"page-size: expected powers of two, found {ps}")
        runs = args.runs or (bench_run.DRY_RUN_RUNS if dry_run else bench_run.DEFAULT_RUNS)
        if runs < 1:
            raise ValueError(f"runs: expected at least 1, found {runs}")
    except (ValueError, OSError) as err:
        print(f"mla-tune bench: {err}", file=sys.stderr)
        return 2

    peers = list(args.peers or PEERS)
    skip = {}
    if dry_run and not args.peers:
        skip = {k: "dry run: only the PyTorch peer runs on the interpreter" for k in PEERS if k != "torch"}
    settings = bench_run.Settings(
        device=torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device()),
        dtype=torch.float16 if dry_run else torch.bfloat16, runs=runs, warmup=args.warmup,
        check_seqs=args.check_seqs, seed=args.seed, dry_run=dry_run,
        eager=not dry_run and not args.no_eager, cache_layout=layout, kv_dtypes=kv_dtypes)
    doc = bench_run.run_bench(rows, page_sizes, peers, settings, skip=skip,
                          log=lambda line: print(line, flush=True))

    if args.out:
        root = Path(args.out)
    elif dry_run or old is not None:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="mla-tune-bench-"))
    else:
        root = paths.results_dir()
    written, message = bench_report.write_results(doc, root / doc["env"]["gpu_key"], figure=not args.no_figure)
    for line in bench_report.summary(doc):
        print(line)
    if message:
        print(message)
    print("wrote " + ", ".join(str(p) for p in written))

    status = 0 if bench_report.ours_ok(doc) else 1
    if status:
        print("ours FAILED the reference check or errored on some rows (see above)", file=sys.stderr)
    if old is not None:
        lines, within = bench_report.compare(old, doc, args.tolerance)
        print("\n".join(lines))
        status = status or (0 if within else 1)
    return status
