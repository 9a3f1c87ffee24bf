"""Write mla-tuner's tuned dispatch as FlashInfer-Bench (flashinfer-bench 0.1.2) solutions into DIR.

One solution per definition served: FlashInfer-Bench's six public `mla_paged` definitions and every other
spec of the catalogue, named alike (mla_paged_decode_h{H}_ckv{C}_kpe{K}_ps{P}, mla_paged_prefill_causal_...,
mla_paged_prefill_... for the non-causal mode). Each is a `main.py` whose `run` takes the definition's inputs
in its order (then its outputs: destination-passing style) and calls tuner.mla_decode / tuner.mla_prefill
with the tuned dispatch behind it; its description names the mla-tuner version, the GPU the dispatch table
was tuned on and the table's sha256. For the shapes FlashInfer-Bench does not publish, a definition written
by mla-tuner (same structure and names, its own words and float32 reference) goes beside it.

With --workloads N, DIR becomes a complete trace set that `flashinfer-bench run --local DIR` runs: every
definition (FlashInfer-Bench's own for the public names with --fib-definitions, checked against mla-tuner's),
N serving-like workloads each (lognormal lengths, pages a random permutation, index arrays in blob/*.safetensors,
sm_scale 1/sqrt(192)), and with --with-flashinfer a FlashInfer solution per definition to compare with.
perf/fib_run.sh does all of that on a GPU machine.

Layout (FlashInfer-Bench's): DIR/solutions/mla-tuner/mla_paged/<definition>/<solution>.json,
DIR/definitions/mla_paged/<definition>.json, DIR/workloads/mla_paged/<definition>.jsonl,
DIR/blob/workloads/mla_paged/<definition>/*.safetensors. Where flashinfer_bench is importable, what was
written is loaded back with its data model (TraceSet.from_path).

Examples:
  mla-tune export-fib /tmp/fib                          # every catalogue spec (66 solutions)
  mla-tune export-fib /tmp/fib --public                 # FlashInfer-Bench's six definitions only
  mla-tune export-fib /tmp/fib --heads 128 --variant decode --gpu nvidia-h200
  mla-tune export-fib /tmp/fib --public --workloads 3 --fib-definitions tests/data/fib --with-flashinfer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tuner.runtime.spec import VARIANTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="where to write (created; files of the same names are replaced)")
    p.add_argument("--heads", type=int, nargs="+", help="only these query head counts (default: all)")
    p.add_argument("--page-size", type=int, nargs="+", help="only these page sizes (default: all)")
    p.add_argument("--variant", choices=VARIANTS, nargs="+", help="only these variants (default: all)")
    p.add_argument("--public", action="store_true", help="only FlashInfer-Bench's six public definitions")
    p.add_argument("--gpu", metavar="KEY", help="the dispatch table the descriptions name (default: this GPU's, "
                                                "else the only table in generated/dispatch/)")
    p.add_argument("--workloads", type=int, default=0, metavar="N",
                   help="also write every definition and N workloads each: a trace set to run (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workloads (default: 0)")
    p.add_argument("--fib-definitions", metavar="PATH", help="a folder of FlashInfer-Bench's definition JSONs "
                   "(e.g. tests/data/fib): copied for the public names, after checking them against ours")
    p.add_argument("--with-flashinfer", action="store_true",
                   help="also a FlashInfer solution per definition (BatchMLAPagedAttentionWrapper), to compare")


def _selected(args: argparse.Namespace) -> list[Any]:
    from tuner.export.definitions import FIB_PUBLIC
    from tuner.runtime.spec import catalogue

    def keep(spec: Any) -> bool:
        return ((not args.heads or spec.num_heads in args.heads)
                and (not args.page_size or spec.page_size in args.page_size)
                and (not args.variant or spec.variant in args.variant)
                and (not args.public or spec.name() in FIB_PUBLIC))

    # FlashInfer-Bench's MLA definitions have no cache scales: the fp8-cache kernels are not exported
    return [spec for spec in catalogue() if keep(spec) and not spec.fp8]


def _fib_definitions(folder: str | None) -> dict[str, dict[str, Any]]:
    """FlashInfer-Bench's definitions in ``folder`` (every ``*.json`` below it), by name."""
    if folder is None:
        return {}
    paths = sorted(Path(folder).rglob("*.json"))
    if not paths:
        raise ValueError(f"--fib-definitions: no *.json below {folder}")
    found = {}
    for path in paths:
        data = json.loads(path.read_text())
        found[data["name"]] = data
    return found


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def export(args: argparse.Namespace) -> list[str]:
    """Write the files; returns the report's lines."""
    from tuner.export.definitions import FIB_PUBLIC, OP_TYPE, definition, differences
    from tuner.export.solutions import AUTHOR, choose_table, flashinfer_solution, solution
    from tuner.export.workloads import write_workloads

    specs = _selected(args)
    if not specs:
        raise ValueError("no catalogue spec matches the --heads/--page-size/--variant/--public filters")
    table = choose_table(args.gpu)
    theirs = _fib_definitions(args.fib_definitions)
    root = Path(args.dir)
    lines = [f"{'definition':<48} {'tuned buckets':>13}  definition" + ("" if not args.workloads else
                                                                       f"{'':<29}workloads")]
    counts = {"solutions": 0, "definitions": 0, "workloads": 0}
    for spec in specs:
        name = spec.name()
        ours = definition(spec)
        if name in theirs:
            wrong = differences(ours, theirs[name])
            if wrong:
                raise ValueError(f"--fib-definitions: {name} differs from mla-tuner's: " + "; ".join(wrong))
            written, source = theirs[name], "FlashInfer-Bench's, checked"
        elif name in FIB_PUBLIC:
            written = ours if args.workloads else None
            source = "mla-tuner's, same interface" if written else "FlashInfer-Bench's public one"
        else:
            written, source = ours, "mla-tuner's"
        if written is not None:
            _write_json(root / "definitions" / OP_TYPE / f"{name}.json", written)
            counts["definitions"] += 1
        solutions = [solution(spec, table)] + ([flashinfer_solution(spec)] if args.with_flashinfer else [])
        for item in solutions:
            _write_json(root / "solutions" / AUTHOR / OP_TYPE / name / f"{item['name']}.json", item)
        counts["solutions"] += len(solutions)
        made = write_workloads(root, spec, written or ours, args.workloads, args.seed) if args.workloads else []
        counts["workloads"] += len(made)
        lines.append(f"{name:<48} {table.tuned.get(name, 0):>13}  " + (f"{source:<39}{len(made)}" if args.workloads
                                                                      else source))
    lines.append(f"wrote {counts['solutions']} solutions (solutions/{AUTHOR}/{OP_TYPE}/<definition>/), "
                 f"{counts['definitions']} definitions (definitions/{OP_TYPE}/)" + (
                     f", {counts['workloads']} workloads (workloads/{OP_TYPE}/, blob/workloads/{OP_TYPE}/)"
                     if args.workloads else ""))
    head = [f"mla-tuner {_version()} -> {root}: {len(specs)} definitions",
            f"dispatch table {table.describe()}"]
    return head + lines + [_validate(root)]


def _version() -> str:
    from tuner.runtime import __version__

    return __version__


def _validate(root: Path) -> str:
    """Load what is in ``root`` with FlashInfer-Bench's data model, where it is installed."""
    try:
        import importlib.metadata

        from flashinfer_bench.data import TraceSet
    except ImportError:
        return "not checked: flashinfer_bench is not installed (pip install --no-deps flashinfer-bench==0.1.2)"
    trace_set = TraceSet.from_path(str(root))
    solutions = sum(len(s) for s in trace_set.solutions.values())
    workloads = sum(len(w) for w in trace_set.workloads.values())
    return (f"loaded back with flashinfer-bench {importlib.metadata.version('flashinfer-bench')}'s data model: "
            f"{len(trace_set.definitions)} definitions, {solutions} solutions, {workloads} workloads")


def run(args: argparse.Namespace) -> int:
    try:
        lines = export(args)
    except (ValueError, ImportError) as err:
        print(f"export-fib: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
