"""The table of a FlashInfer-Bench run over an exported trace set: ``python -m tuner.export.summary DIR``.

Reads the traces ``flashinfer-bench run --local DIR`` appended under ``DIR/traces/`` (plain JSON, no
flashinfer_bench needed) and prints, per definition and workload, the status and mean time of mla-tuner's
solution, its speedup over the definition's reference (the harness's ``speedup_factor``) and, where the
trace set has one, over the FlashInfer solution (FlashInfer's time / ours). Last, how many passed and the
geometric means. Exit status 1 when a solution of ours did not pass (or none ran).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

OURS, FLASHINFER = "mla-tuner_", "flashinfer_"


def load(root: Path) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(definition, workload uuid) -> solution name -> its last trace, in file order."""
    found: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for path in sorted((root / "traces").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                trace = json.loads(line)
                if trace.get("solution") and trace.get("evaluation"):
                    key = (trace["definition"], trace["workload"]["uuid"])
                    found.setdefault(key, {})[trace["solution"]] = trace
    return found


def _label(axes: dict[str, int]) -> str:
    batch = axes.get("batch_size", axes.get("len_indptr", 1) - 1)
    rows = f" q={axes['total_q']}" if "total_q" in axes else ""
    return f"B={batch}{rows} pages={axes.get('num_kv_indices', '?')}"


def _status(trace: dict[str, Any] | None) -> tuple[str, float | None, float | None, float | None]:
    """(status, mean µs, reference ms, speedup over the reference) of one trace."""
    if trace is None:
        return "-", None, None, None
    evaluation = trace["evaluation"]
    perf = evaluation.get("performance") or {}
    if evaluation["status"] != "PASSED" or not perf:
        return evaluation["status"], None, None, None
    return "PASSED", perf["latency_ms"] * 1e3, perf["reference_latency_ms"], perf["speedup_factor"]


def _pick(solutions: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((t for name, t in solutions.items() if name.startswith(prefix)), None)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(root: Path) -> tuple[list[str], bool]:
    """The table's lines, and whether every workload's solution of ours passed (and there was one)."""
    runs = load(root)
    head = (f"{'definition':<48} {'workload':<26} {'ours':<20} {'us':>8} {'ref ms':>8} {'x ref':>7} | "
            f"{'FlashInfer':<20} {'us':>8} {'FI/ours':>7}")
    lines = [f"FlashInfer-Bench results in {root}: mean time per call as the harness times it "
             "(L2 flushed, host work included); x ref = the reference's time / ours; FI/ours = FlashInfer's / ours",
             head, "-" * len(head)]
    passed = total = 0
    over_ref, over_fi = [], []
    for (definition, _), solutions in sorted(runs.items()):
        ours, fi = _pick(solutions, OURS), _pick(solutions, FLASHINFER)
        if ours is None:
            continue
        total += 1
        status, us, ref_ms, x_ref = _status(ours)
        fi_status, fi_us, _, _ = _status(fi)
        ratio = fi_us / us if us and fi_us else None
        passed += status == "PASSED"
        over_ref += [x_ref] if x_ref else []
        over_fi += [ratio] if ratio else []
        lines.append(f"{definition:<48} {_label(ours['workload']['axes']):<26} {status:<20} {_num(us, '.1f'):>8} "
                     f"{_num(ref_ms, '.2f'):>8} {_num(x_ref, '.0f'):>7} | {fi_status:<20} {_num(fi_us, '.1f'):>8} "
                     f"{_num(ratio, '.2f'):>7}")
    mean_ref, mean_fi = _geomean(over_ref), _geomean(over_fi)
    lines.append(f"ours passed {passed} of {total} workloads; geometric mean speedup over the reference "
                 f"{_num(mean_ref, '.0f')}x, over FlashInfer {_num(mean_fi, '.2f')}x ({len(over_fi)} workloads "
                 "where both passed)")
    return lines, total > 0 and passed == total


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuner.export.summary DIR", file=sys.stderr)
        return 2
    lines, ok = summarize(Path(args[0]))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
