"""Show the dispatch table this machine would use, and the config each shape bucket gets.

Without a name: the GPU, the table file it would read (and where), and every kernel with entries in it,
with its tuned buckets. With a kernel name: its generated module, and per shape bucket the config used,
where it comes from (this GPU's entry, another GPU of the same compute capability, or the default), the
tuned and default times and the versions the entry was tuned with.

Examples:
  mla-tune show
  mla-tune show mla_paged_decode_h16_ckv512_kpe64_ps64
  mla-tune show --gpu nvidia-h200              # the committed table of another GPU
  mla-tune show --table ~/.cache/mla-tuner/dry-run/dispatch/cpu-interpreter.json

Without a GPU, after ``mla-tune tune`` (a dry run), it shows the dry-run table that tune wrote into the
cache folder (the runtime never reads that one).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a kernel name, e.g. mla_paged_decode_h16_ckv512_kpe64_ps1 "
                                           "(default: list every kernel of the table)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--gpu", metavar="KEY", help="the committed table of this GPU key (e.g. nvidia-h200) "
                                                    "instead of the current device's")
    which.add_argument("--table", metavar="PATH", help="a table file, e.g. one written by `mla-tune tune --out`")


def _which_table(args: argparse.Namespace) -> tuple[Any, Path, str]:
    """(GPUInfo, table path, what it is) for the arguments."""
    from tuner.runtime import paths
    from tuner.runtime.device import gpu_info
    from tuner.runtime.dispatch import INTERPRETER_CAPABILITY, load_table, table_path

    if args.table:
        path = Path(args.table)
        if not path.is_file():
            raise SystemExit(f"--table: no such file {path}")
        return load_table(path).gpu, path, "given with --table"
    if args.gpu:
        path = table_path(args.gpu)
        if not path.is_file():
            raise SystemExit(f"--gpu: no dispatch table {path}")
        return load_table(path).gpu, path, "committed"
    gpu = gpu_info()
    path = table_path(gpu.key)
    if gpu.capability == INTERPRETER_CAPABILITY and not path.is_file():
        dry = table_path(gpu.key, paths.dry_run_dispatch_dir())
        if dry.is_file():
            return gpu, dry, "the dry-run table of the last `mla-tune tune` without a GPU; the runtime does not read it"
    return gpu, path, "read by the runtime on this machine"


def _list(table: Any) -> None:
    from .space import compact

    if table is None or not table.kernels:
        print("no tuned entries: every kernel runs its default config (run `mla-tune tune` on this GPU)")
        return
    for kernel, entries in sorted(table.kernels.items()):
        print(kernel)
        for bucket, entry in sorted(entries.items()):
            speedup = f"{entry.speedup:.2f}x the default" if entry.speedup else ""
            print(f"  {bucket:<14} {entry.time_us:>8.1f} us  {speedup:<18} {compact(entry.config)}")
    print("(`mla-tune show NAME` for one kernel's buckets and their ranges)")


def run(args: argparse.Namespace) -> int:
    from tuner.runtime import dispatch
    from tuner.runtime.buckets import buckets_for
    from tuner.runtime.loader import module_hash, module_path
    from tuner.runtime.spec import MLASpec

    from .space import compact

    gpu, path, what = _which_table(args)
    table = None
    try:
        table = dispatch.load_table(path) if path.is_file() else None
    except dispatch.DispatchTableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"GPU: {gpu.describe()}")
    print(f"dispatch table: {path} ({what if table is not None else 'none yet'})")
    if args.name is None:
        _list(table)
        return 0
    try:
        spec = MLASpec.from_name(args.name)
        print(f"{spec.name()}\n  module: {module_path(spec)} (hash {module_hash(spec)})")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [["bucket", "range (kv: mean per request)", "config", "us", "default us", "speedup", "source",
             "tuned with"]]
    notes: list[str] = []
    for bucket in buckets_for(spec):
        entry = table.entry(spec.name(), bucket.name) if table is not None else None
        if args.table:
            config, source = (entry.config, "the table given") if entry else (None, "-")
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", dispatch.DispatchWarning)
                config, _, source = dispatch.select(spec, bucket.rows[0] + 1, bucket.kv[0] + 1.0, gpu)
            notes += [str(w.message) for w in caught]
            if source.startswith("tuned on") and source != f"tuned on {gpu.key}":
                entry = None  # times measured on another GPU are not shown as this GPU's
        rows.append([bucket.name, bucket.describe(), compact(config) if config else "default",
                     f"{entry.time_us:.1f}" if entry else "-",
                     f"{entry.default_time_us:.1f}" if entry and entry.default_time_us else "-",
                     f"{entry.speedup:.2f}x" if entry and entry.speedup else "-", source,
                     " ".join(f"{k} {v}" for k, v in sorted(entry.versions.items())) if entry else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for note in dict.fromkeys(notes):
        print(f"  note: {note}")
    dispatch.reload()  # forget the warnings recorded above
    return 0
