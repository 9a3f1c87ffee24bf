"""Search each kernel's launch parameters on this GPU, per shape bucket, and write the dispatch table.

With no arguments: the default catalogue (DeepSeek-V3 at tensor parallel 8: 16 heads, ckv 512,
kpe 64; page sizes 1 and 64; decode and causal prefill; every bucket) on the current GPU, then a
summary table, then generated/dispatch/<gpu key>.json (merged with what is there). Studies live in
an Optuna journal in the cache folder and resume after an interrupt.

Without a GPU (or with --dry-run) the same pipeline runs under the Triton interpreter on a tiny
built-in problem: its timings are CPU wall time and mean nothing, and its table goes to a scratch
folder (or --out), never to generated/; `mla-tune show` shows it.

A new study measures the default config, then the winners of the nearest tuned shapes (seeds, from
the table it writes and the tables the runtime reads), then TPE's proposals, and stops once --patience
candidates in a row gained no more than 1% on its best. One line per finished study says how far the
run is and about how long it has left.

Examples:
  mla-tune tune                                            # the default catalogue, up to 48 trials per bucket
  mla-tune tune --heads 64 --page-size 16                  # one shape of your own (seeded from the table)
  mla-tune tune --catalogue --minutes 15                   # every decode and causal-prefill module, 15 minutes
  mla-tune tune --catalogue --missing                      # only what the table lacks (a cut-short run's rest)
  mla-tune tune --model deepseek-v3-tp1 --variant decode   # 128 heads, decode only
  mla-tune tune --page-size 16 --buckets b1-16_kv1-2k --trials 24
  mla-tune tune --minutes 20                               # a time budget for the whole run
  mla-tune tune --storage postgresql://user:pw@host/db     # many GPUs/hosts on one set of studies
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS: dict[str, tuple[int, int, int]] = {
    "deepseek-v3-tp1": (128, 512, 64),
    "deepseek-v3-tp2": (64, 512, 64),
    "deepseek-v3-tp4": (32, 512, 64),
    "deepseek-v3-tp8": (16, 512, 64),
    "deepseek-v3-tp16": (8, 512, 64),
    "kimi-k2": (64, 512, 64),
    "kimi-k2-tp8": (8, 512, 64),
}
"""Model presets: (query heads per GPU, head_dim_ckv, head_dim_kpe)."""

DEFAULT_MODEL = "deepseek-v3-tp8"
DEFAULT_VARIANTS = ("decode", "prefill_causal")
DEFAULT_PAGE_SIZES = (1, 64)
TINY_SHAPE = (8, 32, 16)
"""The dry run's built-in problem: 8 heads, ckv 32, kpe 16 (page sizes 1 and 4)."""
TINY_PAGE_SIZES = (1, 4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tuner.runtime.spec import VARIANTS

    from .task import Settings

    d = Settings()

    shape = p.add_argument_group("what to tune (default: the catalogue of --model)")
    shape.add_argument("--model", choices=sorted(MODELS), help=f"shape preset (default: {DEFAULT_MODEL})")
    shape.add_argument("--heads", type=int, nargs="+", help="query heads (overrides --model)")
    shape.add_argument("--ckv", type=int, help="head_dim_ckv (default: 512)")
    shape.add_argument("--kpe", type=int, help="head_dim_kpe (default: 64)")
    shape.add_argument("--page-size", type=int, nargs="+", help="page sizes (default: 1 64)")
    shape.add_argument("--variant", choices=VARIANTS, nargs="+", help="default: decode prefill_causal")
    shape.add_argument("--buckets", nargs="+", metavar="NAME",
                       help="only these buckets (see `mla-tune show`; e.g. b1-16_kv1-2k q2k+_kv2k+)")
    shape.add_argument("--kv-dtype", choices=("bf16", "fp8", "both"), default="bf16",
                       help="the cache: bf16 (16-bit, the queries' dtype; default), fp8 (float8_e4m3fn with "
                            "per-tensor scales: its own kernels and table entries), or both")
    shape.add_argument("--missing", action="store_true",
                       help="only the buckets the table this run writes (--out, else generated/dispatch) lacks for "
                            "this GPU, or holds for another version of the kernel: finishes a run whose journal "
                            "is gone, or extends a table")
    shape.add_argument("--catalogue", action="store_true",
                       help="every decode and causal-prefill module of the built-in catalogue (220 studies; "
                            "--heads, --page-size, --ckv, --kpe and --variant narrow it)")
    budget = p.add_argument_group("budget")
    budget.add_argument("--trials", type=int, help="candidates measured per bucket (default 48; dry run 4)")
    budget.add_argument("--minutes", type=float,
                        help="time for the whole run: each study searches for an equal share of the time left "
                             "(studies that stop early leave more to the rest); with --trials, whichever ends first")
    budget.add_argument("--exhaustive", action="store_true",
                        help="sweep every feasible config of one bucket (to compare with TPE)")
    budget.add_argument("--patience", type=int, help=f"stop a study once this many candidates in a row gained no "
                                                     f"more than {d.min_gain * 100:.0f}%% on its best (default "
                                                     f"{d.patience}; 0: never)")
    budget.add_argument("--min-trials", type=int, help=f"candidates a study measures before it may stop early "
                                                       f"(default {d.min_trials})")
    budget.add_argument("--seeds", type=int, help=f"configs of the nearest tuned shapes a new study measures after "
                                                  f"the default (default {d.seeds}; 0: none)")
    budget.add_argument("--runs", type=int, help="timed runs per candidate while searching (default 20)")
    budget.add_argument("--final-runs", type=int, help="timed runs when re-timing the finalists (default 100)")
    run = p.add_argument_group("where and how")
    run.add_argument("--storage", help="Optuna storage URL (default: a journal file in the cache folder; "
                                       "postgresql://... to share studies between GPUs and hosts)")
    run.add_argument("--workers", type=int, default=1, help="worker processes, one per visible GPU (default 1)")
    run.add_argument("--compile-workers", type=int, help="compile processes per worker (default: cores - 2)")
    run.add_argument("--heartbeat", type=int, default=10, help="heartbeat seconds for RDB storages (default 10)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", help="write the table into this folder (default: generated/dispatch; dry run: "
                                   "the cache folder)")
    run.add_argument("--dry-run", action="store_true",
                     help="run the pipeline under the Triton interpreter on a tiny problem (automatic without a GPU)")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def _specs(args: argparse.Namespace, dry: bool) -> list:  # -> list[MLASpec]
    from tuner.runtime.spec import MLASpec, catalogue

    fp8s = {"bf16": (False,), "fp8": (True,), "both": (False, True)}[getattr(args, "kv_dtype", None) or "bf16"]
    if args.catalogue:
        variants = args.variant or list(DEFAULT_VARIANTS)
        return [s for s in catalogue() if s.variant in variants and (not args.heads or s.num_heads in args.heads)
                and s.fp8 in fp8s and (not args.page_size or s.page_size in args.page_size)
                and args.ckv in (None, s.head_dim_ckv) and args.kpe in (None, s.head_dim_kpe)]
    custom = any(x is not None for x in (args.model, args.heads, args.ckv, args.kpe))
    if dry and not custom:
        heads, ckv, kpe = [TINY_SHAPE[0]], TINY_SHAPE[1], TINY_SHAPE[2]
        page_sizes = args.page_size or list(TINY_PAGE_SIZES)
    else:
        m_heads, m_ckv, m_kpe = MODELS[args.model or DEFAULT_MODEL]
        heads, ckv, kpe = args.heads or [m_heads], args.ckv or m_ckv, args.kpe or m_kpe
        page_sizes = args.page_size or list(DEFAULT_PAGE_SIZES)
    variants = args.variant or list(DEFAULT_VARIANTS)
    return sorted({MLASpec(v, h, ckv, kpe, ps, fp8) for v in variants for h in heads for ps in page_sizes
                   for fp8 in fp8s})


def build_tasks(args: argparse.Namespace, dry: bool) -> list:  # -> list[Task]
    from tuner.runtime.buckets import DECODE_BUCKETS, PREFILL_BUCKETS, buckets_for

    from .task import Task
    from .transfer import order_tasks

    known = {b.name for b in DECODE_BUCKETS + PREFILL_BUCKETS}
    unknown = sorted(set(args.buckets or ()) - known)
    if unknown:
        raise SystemExit(f"--buckets: unknown {unknown}; expected some of {sorted(known)}")
    tasks = []
    for spec in _specs(args, dry):
        chosen = [b for b in buckets_for(spec) if b.name in args.buckets] if args.buckets else \
            list(buckets_for(spec))[:1] if dry else list(buckets_for(spec))
        tasks += [Task(spec, b, tiny=dry) for b in chosen]
    if not tasks:
        raise SystemExit("nothing to tune: no kernel variant has the buckets asked for")
    tasks = order_tasks(tasks)
    if args.exhaustive and len(tasks) != 1:
        raise SystemExit(f"--exhaustive sweeps one bucket of one kernel; the arguments select {len(tasks)} "
                         "(narrow them with --variant, --page-size, --heads and --buckets)")
    return tasks


def missing_tasks(tasks: list, table: Path) -> list:  # -> list[Task]
    """The tasks whose bucket ``table`` (a dispatch table file) has no entry for, or one tuned for another
    version of the kernel (another module hash); all of them when the file does not exist."""
    from tuner.runtime.derive import fresh
    from tuner.runtime.dispatch import DispatchTableError, load_table

    if not table.exists():
        return tasks
    try:
        loaded = load_table(table)
    except DispatchTableError as err:
        raise SystemExit(f"--missing: {err}") from None
    kept = []
    for t in tasks:
        entry = loaded.entry(t.spec.name(), t.bucket.name)
        if entry is None or not fresh(t.spec, entry):
            kept.append(t)
    return kept


def build_settings(args: argparse.Namespace, dry: bool, n_tasks: int):  # -> task.Settings
    from .precompile import default_workers
    from .task import Settings

    s = Settings(seed=args.seed, heartbeat_s=args.heartbeat, exhaustive=args.exhaustive)
    if dry:
        s.trials, s.runs, s.warmup, s.final_runs, s.finalists, s.startup_trials = 4, 2, 1, 3, 2, 2
        s.compile_workers = 1
    else:
        s.compile_workers = max(1, default_workers() // max(1, args.workers))
    if args.trials is not None:
        s.trials = args.trials
    elif args.minutes is not None:
        s.trials = 10**6  # the time budget decides
    if args.minutes is not None:
        s.seconds = args.minutes * 60 / n_tasks  # a study's share (search.run_tasks shares out what is left)
    for name, value in (("runs", args.runs), ("final_runs", args.final_runs), ("compile_workers", args.compile_workers),
                        ("patience", args.patience), ("min_trials", args.min_trials), ("seeds", args.seeds)):
        if value is not None:
            setattr(s, name, value)
    if min(s.trials, s.runs, s.final_runs, s.compile_workers, args.workers) < 1:
        raise SystemExit("--trials, --runs, --final-runs, --workers and --compile-workers must be at least 1")
    if min(s.patience, s.min_trials, s.seeds) < 0:
        raise SystemExit("--patience, --min-trials and --seeds must be at least 0")
    return s


def _visible_gpus(n: int) -> list[str]:
    import torch

    listed = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    ids = listed or [str(i) for i in range(torch.cuda.device_count())]
    if n > len(ids):
        raise SystemExit(f"--workers: {n} asked, {len(ids)} GPU(s) visible")
    return ids[:n]


def _worker_argv(args: argparse.Namespace, index: int, storage: str, compile_workers: int) -> list[str]:
    argv = [sys.executable, "-m", "tuner", "tune", "--worker-index", str(index), "--storage", storage,
            "--seed", str(args.seed), "--heartbeat", str(args.heartbeat), "--compile-workers", str(compile_workers)]
    for flag, value in (("--workers", args.workers), ("--model", args.model), ("--ckv", args.ckv), ("--kpe", args.kpe),
                        ("--trials", args.trials), ("--minutes", args.minutes), ("--runs", args.runs),
                        ("--final-runs", args.final_runs), ("--patience", args.patience),
                        ("--min-trials", args.min_trials), ("--seeds", args.seeds), ("--out", args.out),
                        ("--kv-dtype", args.kv_dtype)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, values in (("--heads", args.heads), ("--page-size", args.page_size),
                         ("--variant", args.variant), ("--buckets", args.buckets)):
        if values:
            argv += [flag, *map(str, values)]
    argv += ["--dry-run"] * args.dry_run + ["--exhaustive"] * args.exhaustive + ["--catalogue"] * args.catalogue \
        + ["--missing"] * args.missing
    return argv


def _run_workers(args: argparse.Namespace, storage: str, dry: bool, compile_workers: int, poll: Any) -> int:
    """Start one worker process per GPU (or N interpreter workers) on the same studies; wait."""
    gpus = [None] * args.workers if dry else _visible_gpus(args.workers)
    procs = []
    for i, gpu in enumerate(gpus):
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if dry:
            env["TRITON_INTERPRET"] = "1"
        procs.append(subprocess.Popen(_worker_argv(args, i, storage, compile_workers), env=env))
    try:
        while any(p.poll() is None for p in procs):
            poll()
            time.sleep(2.0)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    poll()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    for i in failed:
        print(f"worker {i} exited with status {procs[i].returncode}", file=sys.stderr)
    return len(failed)


def _format_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def print_summary(results: list, dry: bool) -> None:  # results: list[task.StudyResult]
    from .space import compact

    header = ["kernel", "bucket", "best config", "us", "default us", "speedup", "of floor", "trials"]
    rows = []
    for r in results:
        speed = "-" if r.best_us is None or r.default_us is None else f"{r.default_us / r.best_us:.2f}x"
        floor = "-" if r.best_us is None or math.isnan(r.floor_us) else f"{r.floor_us / r.best_us:.0%}"
        rows.append([r.task.spec.name(), r.task.bucket.name, "-" if r.best is None else compact(r.best),
                     "-" if r.best_us is None else f"{r.best_us:.1f}",
                     "-" if r.default_us is None else f"{r.default_us:.1f}", speed, floor, str(r.counted)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    print(_format_row(header, widths))
    print(_format_row(["-" * w for w in widths], widths))
    for row in rows:
        print(_format_row(row, widths))
    for r in results:
        bad = {k: v for k, v in r.outcomes.items() if k in ("incorrect", "compile_error", "launch_error", "crash")}
        if bad:
            print(f"note: {r.task.label}: {bad} (see the trials' user attrs: `outcome`, `reason`)")
        for note in r.notes:
            print(f"note: {r.task.label}: {note}")
    if dry:
        print("\nDRY RUN under the Triton interpreter: the times above are CPU wall time and mean nothing "
              "about GPU speed.")


def _exporter(gpu: Any, out: Path | None, progress: Any) -> Any:
    """A callback that merges each finished study's entry into the table at once (so that a run cut
    short keeps what it finished, and later studies take it as a seed) and reports it (``progress``)."""
    from tuner.runtime.dispatch import merge

    def export(result: Any) -> None:
        if result.entry is not None:
            merge(gpu, {(result.task.spec.name(), result.task.bucket.name): result.entry}, out)
        progress(result)

    return export


def _report_exhaustive(result: Any, ctx: Any, task: Any) -> None:
    """Print how the TPE study of the same bucket compares with the exhaustive sweep."""
    import dataclasses
    import json

    from .finalize import tpe_vs_grid
    from .search import load_study, prepare

    grid_best = min(t.value for t in load_study(result.study_name, ctx.storage).get_trials(deepcopy=False)
                    if t.value is not None and t.user_attrs.get("outcome") == "ok")
    tpe_ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, exhaustive=False))
    tpe = load_study(prepare(task, tpe_ctx).name, ctx.storage)
    report: dict[str, Any] = {"bucket": task.label, "grid_points": result.counted,
                              "grid_measured": sum(result.outcomes[k] for k in ("ok", "incorrect", "compile_error",
                                                                                 "out_of_resources", "launch_error")),
                              "grid_best_us": grid_best, "outcomes": dict(result.outcomes)}
    comparison = tpe_vs_grid(tpe, grid_best) if tpe is not None else None
    if comparison is None:
        print(f"\nexhaustive: best {grid_best:.2f} us over {result.counted} points; no TPE study of this bucket "
              "in this storage to compare with (run the same command without --exhaustive first)")
    else:
        report.update(comparison)
        reached = comparison["reached_at"]
        print(f"\nexhaustive sweep: {result.counted} feasible points, best {grid_best:.2f} us; TPE: best "
              f"{comparison['tpe_best_us']:.2f} us ({comparison['tpe_best_us'] / grid_best:.3f}x) after "
              f"{comparison['tpe_measured']} measured candidates; within 3% after "
              f"{reached if reached is not None else 'never'}")
    print("exhaustive-vs-tpe " + json.dumps(report, sort_keys=True))


def run(args: argparse.Namespace) -> int:
    import torch

    dry = bool(args.dry_run) or not torch.cuda.is_available()
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before any generated module is imported
    import optuna

    from tuner.runtime import dispatch, paths
    from tuner.runtime.device import gpu_info

    from . import objective, search, studies
    from .measure import device_limits, measure_floors

    device = torch.device("cpu") if dry else torch.device("cuda")
    gpu = gpu_info(device)
    out = Path(args.out) if args.out else (paths.dry_run_dispatch_dir() if dry else None)
    tasks = build_tasks(args, dry)
    if args.missing:
        table = dispatch.table_path(gpu.key, out)
        tasks = missing_tasks(tasks, table)
        if not tasks:
            print(f"nothing to tune: {table} has a current entry for every bucket asked for")
            return 0
    settings = build_settings(args, dry, len(tasks))
    scratch = None
    storage_url = args.storage
    if storage_url is None and (dry or args.workers > 1):
        if dry:  # a dry run starts afresh each time
            scratch = tempfile.mkdtemp(prefix="mla-tune-dry-")
            storage_url = f"journal:{scratch}/studies.journal"
        else:
            storage_url = f"journal:{studies.default_journal()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    deadline = None if args.minutes is None else time.monotonic() + args.minutes * 60
    ctx = search.Context(device=device, gpu_key=gpu.key, storage=studies.make_storage(storage_url, args.heartbeat),
                         settings=settings, limits=device_limits(device), worker_index=args.worker_index or 0,
                         workers=args.workers, dtype=torch.float16 if dry else torch.bfloat16, out=out,
                         deadline=deadline)
    if args.worker_index is not None:  # one of several workers: trials only; the parent finalizes
        search.run_tasks(tasks, ctx, finalize_each=False)
        return 0

    if dry:
        print(f"DRY RUN: Triton interpreter on a tiny problem ({len(tasks)} studies); timings mean nothing.")
    else:
        print(f"tuning {len(tasks)} studies on {gpu.describe()}; storage: {storage_url or studies.default_journal()}")
    floors = measure_floors(device)
    if floors is not None:
        print(f"floors: copy {floors.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
              f"{floors.matmul_flops_per_s / 1e12:.0f} TFLOP/s")
    from tqdm.auto import tqdm

    from .progress import Progress

    # With early stopping or a time budget the number of trials is not known in advance: no total.
    total = None if settings.patience or settings.seconds is not None and args.trials is None or args.exhaustive \
        else settings.trials * len(tasks)
    print(f"up to {settings.trials} candidates per study; " + (
        f"a study stops once {settings.patience} in a row gain no more than {settings.min_gain:.0%} on its best "
        f"(after at least {settings.min_trials})" if settings.patience else "no early stop") +
        f"; up to {settings.seeds} seeds from the nearest tuned shapes" * bool(settings.seeds))
    bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)
    export = _exporter(gpu, out, Progress(len(tasks), bar.write))
    started = time.monotonic()
    try:
        if args.workers > 1:
            def poll() -> None:
                bar.n = search.study_progress(tasks, ctx)
                bar.refresh()

            failures = _run_workers(args, storage_url, dry, settings.compile_workers, poll)
            results = search.finalize_tasks(tasks, ctx, floors, on_result=export)
        else:
            failures = 0
            results = search.run_tasks(tasks, ctx, floors, on_counted=bar.update, on_result=export)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: finished trials are kept in {storage_url or studies.default_journal()}; run the "
              "same command again to resume" + (" (a dry run always starts afresh)" if scratch else ""),
              file=sys.stderr)
        return 130
    except objective.CrashError as err:
        bar.close()
        print(f"\n{err}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.0f} s")
    print_summary(results, dry)
    if args.exhaustive and results:
        _report_exhaustive(results[0], ctx, tasks[0])
    written = sum(1 for r in results if r.entry is not None)
    print(f"wrote {written} entries to {dispatch.table_path(gpu.key, out)}" if written else "no entries to write")
    return 1 if failures else 0
