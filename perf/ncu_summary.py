"""Summarise an Nsight Compute CSV of perf/profile_rows.py: one line per profiled kernel.

    python perf/ncu_summary.py ncu.csv ROW:PAGE_SIZE...   (the rows in the order profile_rows.py ran them)

Each decode row launches stage 1 then stage 2 (prefill rows one kernel); the kernels are matched to the
rows in that order. Prints duration, DRAM and SM throughput (% of peak), achieved occupancy and warp
cycles per issued instruction. Development tool for perf/LOG.md.
"""

from __future__ import annotations

import csv
import sys
from collections import OrderedDict

METRICS = {"Duration": "µs", "DRAM Throughput": "DRAM%", "Compute (SM) Throughput": "SM%",
           "Achieved Occupancy": "occ%", "Warp Cycles Per Issued Instruction": "cyc/inst"}
SCALE = {"ns": 1e3, "nsecond": 1e3, "us": 1.0, "usecond": 1.0, "ms": 1e-3, "msecond": 1e-3}  # to µs


def main(path: str, rows: list[str]) -> None:
    kernels: OrderedDict[str, dict[str, str]] = OrderedDict()
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for rec in csv.DictReader(lines):
        k = kernels.setdefault(rec["ID"], {"name": rec["Kernel Name"], "grid": rec["Grid Size"]})
        if rec["Metric Name"] in METRICS:
            value = float(rec["Metric Value"].replace(",", ""))
            if rec["Metric Name"] == "Duration":
                value /= SCALE.get(rec["Metric Unit"], 1e3)
            k[METRICS[rec["Metric Name"]]] = f"{value:.1f}"
    queue = list(rows)
    row = ""
    print(f"{'row':<18} {'kernel':<20} {'grid':>12} " + " ".join(f"{m:>8}" for m in METRICS.values()))
    for k in kernels.values():
        if "stage2" not in k["name"] and queue:
            row = queue.pop(0)
        values = " ".join(f"{k.get(m, '-'):>8}" for m in METRICS.values())
        print(f"{row:<18} {k['name'][:20]:<20} {k['grid']:>12} {values}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
