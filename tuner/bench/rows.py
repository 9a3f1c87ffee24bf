"""The benchmark's rows: the public benchmark set, the dry-run set, a custom shape, and rows read back
from a results file."""

from __future__ import annotations

from typing import Any

from tuner.harness.inputs import Workload, benchmark_set


def dry_run_set() -> list[Workload]:
    """Tiny rows for the interpreter: partial pages at page size 64, a skewed batch, a causal prefill."""
    return [Workload("dry-d-b3", 16, (70, 5, 33)), Workload("dry-p-b2", 16, (40, 9), (6, 3))]


def custom_workload(heads: int, batch: int, kv_len: int, q_len: int | None = None) -> Workload:
    """A user's shape: ``batch`` sequences of ``kv_len`` tokens; decode, or a causal prefill of
    ``q_len`` queries per sequence (the last q_len tokens)."""
    for name, value in (("heads", heads), ("batch", batch), ("kv_len", kv_len)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive int, found {value}")
    if q_len is None:
        return Workload(f"h{heads}-b{batch}-kv{kv_len}", heads, (kv_len,) * batch)
    if not 1 <= q_len <= kv_len:
        raise ValueError(f"q_len: expected 1 .. kv_len={kv_len}, found {q_len}")
    return Workload(f"h{heads}-b{batch}-q{q_len}-kv{kv_len}", heads, (kv_len,) * batch, (q_len,) * batch)


def known_rows(dry_run: bool) -> dict[str, Workload]:
    return {w.name: w for w in (dry_run_set() if dry_run else benchmark_set())}


def select_rows(ids: list[str] | None, dry_run: bool) -> list[Workload]:
    """Rows by id (all of the set when ``ids`` is empty); ValueError naming the known ids."""
    known = known_rows(dry_run)
    if not ids:
        return list(known.values())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"rows: unknown id(s) {unknown}; expected some of {list(known)}")
    return [known[i] for i in ids]


def _workload_dict(w: Workload) -> dict[str, Any]:
    return {"heads": w.heads, "kv_lens": list(w.kv_lens),
            "q_lens": None if w.q_lens is None else list(w.q_lens), "causal": w.causal,
            "head_dim_ckv": w.head_dim_ckv, "head_dim_kpe": w.head_dim_kpe}


def rows_of(doc: dict[str, Any]) -> list[Workload]:
    """The workloads of a results document, in order (custom rows from their stored definition)."""
    known = {**known_rows(False), **known_rows(True)}
    rows: dict[str, Workload] = {}
    for r in doc["rows"]:
        if r["row"] in rows:
            continue
        if r["row"] in known:
            rows[r["row"]] = known[r["row"]]
        elif r.get("workload"):
            d = r["workload"]
            rows[r["row"]] = Workload(r["row"], d["heads"], tuple(d["kv_lens"]),
                                      None if d["q_lens"] is None else tuple(d["q_lens"]), d["causal"],
                                      d["head_dim_ckv"], d["head_dim_kpe"])
        else:
            raise ValueError(f"row {r['row']!r}: not in the benchmark set and no stored workload")
    return list(rows.values())
