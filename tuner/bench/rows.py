"""The benchmark's rows: the public benchmark set, the dry-run set, a custom shape, and rows read back
from a results file."""

from __future__ import annotations

from typing import Any

from tuner.harness.inputs import ROW_SETS, Workload, benchmark_set

SETS = (*ROW_SETS, "all")  # --set: one set of docs/benchmark_set.md, or all of them


def dry_run_set(sets: tuple[str, ...] | list[str] | None = None) -> list[Workload]:
    """Tiny rows for the interpreter, one small stand-in per set of the benchmark set (None: all):
    public: partial pages at page size 64, a skewed batch, a causal prefill; mtp: two queries per
    request; off: a row with its own page size (16)."""
    rows = {"public": [Workload("dry-d-b3", 16, (70, 5, 33)), Workload("dry-p-b2", 16, (40, 9), (6, 3))],
            "mtp": [Workload("dry-mtp2-b3", 16, (70, 5, 33), (2, 2, 2))],
            "off": [Workload("dry-o-ps16-b3", 16, (40, 3, 17), page_size=16)]}
    return [w for name in (list(rows) if sets is None else sets) for w in rows[name]]


def set_names(choice: str | None) -> list[str]:
    """The sets of ``--set CHOICE`` (None or "all": every set)."""
    if choice in (None, "all"):
        return list(ROW_SETS)
    if choice not in ROW_SETS:
        raise ValueError(f"set: expected one of {list(SETS)}, found {choice!r}")
    return [choice]


def page_sizes_of(w: Workload, page_sizes: list[int]) -> list[int]:
    """The page sizes a row runs at: its own when it has one, otherwise ``page_sizes``."""
    return [w.page_size] if w.page_size is not None else list(page_sizes)


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


def known_rows(dry_run: bool, choice: str | None = None) -> dict[str, Workload]:
    """The rows of ``--set CHOICE`` by id (the dry run's tiny stand-ins in a dry run)."""
    sets = set_names(choice)
    return {w.name: w for w in (dry_run_set(sets) if dry_run else benchmark_set(sets))}


def select_rows(ids: list[str] | None, dry_run: bool, choice: str | None = None) -> list[Workload]:
    """Rows by id among those of ``--set CHOICE`` (all of them when ``ids`` is empty); ValueError naming
    the known ids."""
    known = known_rows(dry_run, choice)
    if not ids:
        return list(known.values())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"rows: unknown id(s) {unknown}; expected some of {list(known)}")
    return [known[i] for i in ids]


def _workload_dict(w: Workload) -> dict[str, Any]:
    return {"heads": w.heads, "kv_lens": list(w.kv_lens),
            "q_lens": None if w.q_lens is None else list(w.q_lens), "causal": w.causal,
            "head_dim_ckv": w.head_dim_ckv, "head_dim_kpe": w.head_dim_kpe, "page_size": w.page_size}


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
                                      d["head_dim_ckv"], d["head_dim_kpe"], d.get("page_size"))
        else:
            raise ValueError(f"row {r['row']!r}: not in the benchmark set and no stored workload")
    return list(rows.values())
