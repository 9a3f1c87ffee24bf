"""Print a kernel's generated module and the config each shape bucket dispatches to on this GPU.

``mla-tune show mla_paged_decode_h16_ckv512_kpe64_ps1`` prints the module's path and hash, the
dispatch table read, and per bucket: the config used, where it comes from (this GPU's entry, another
GPU of the same compute capability, or the default), the tuned and default times and the versions the
entry was tuned with. Without a name it lists the kernels that have entries for this GPU.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="kernel name, e.g. mla_paged_decode_h16_ckv512_kpe64_ps1")
    p.add_argument("--gpu", help="show the table of this GPU key instead of the current device's")


def _gpu(key: str | None):  # -> GPUInfo
    from tuner.runtime.device import gpu_info
    from tuner.runtime.dispatch import load_table, table_path

    if key is None:
        return gpu_info()
    path = table_path(key)
    if not path.is_file():
        raise SystemExit(f"--gpu: no dispatch table {path}")
    return load_table(path).gpu


def _probe(bucket) -> tuple[int, float]:  # a (rows, avg_kv) inside the bucket
    return bucket.rows[0] + 1, bucket.kv[0] + 1.0


def run(args: argparse.Namespace) -> int:
    from tuner.runtime import dispatch
    from tuner.runtime.buckets import buckets_for
    from tuner.runtime.loader import module_hash, module_path
    from tuner.runtime.spec import MLASpec

    from .space import compact

    gpu = _gpu(args.gpu)
    path = dispatch.table_path(gpu.key)
    table = None
    try:
        table = dispatch.load_table(path) if path.is_file() else None
    except dispatch.DispatchTableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"GPU: {gpu.name} ({gpu.key}, capability {gpu.capability}, {gpu.num_sms} SMs)")
    print(f"dispatch table: {path}{'' if table is not None else ' (none)'}")
    if args.name is None:
        for kernel, entries in sorted((table.kernels if table else {}).items()):
            print(f"  {kernel}: {', '.join(sorted(entries))}")
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dispatch.DispatchWarning)
            config, _, source = dispatch.select(spec, *_probe(bucket), gpu)
        notes += [str(w.message) for w in caught]
        entry = table.entry(spec.name(), bucket.name) if table is not None else None
        if source.startswith("tuned on") and source != f"tuned on {gpu.key}":
            entry = None  # times measured on another GPU are not shown as this GPU's
        rows.append([bucket.name, bucket.describe(), compact(config),
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
