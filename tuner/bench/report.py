"""The benchmark's report: the table streamed to stdout and its summary, the files (bench.json, bench.csv,
bench.png, and bench_fp8.md when fp8 rows ran; ``results/README.md`` describes them) and the comparison
with committed results.

A row over an fp8 cache (``kv_dtype: "fp8"``) keeps its workload's id in ``row`` and is shown as
``<id>:fp8`` (:func:`row_label`); the fp8 table (:func:`fp8_table`) puts ours' fp8 time beside its bf16
time of the same run and the peers' fp8 times."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tuner.harness.floors import ratio
from tuner.runtime.fileio import write_atomic

SCHEMA_VERSION = 1
OURS = ("ours", "ours_fn", "ours_default")  # plan/run (timed against the peers), one call, untuned default
DRY_RUN_NOTE = ("DRY RUN: Triton interpreter on the CPU, tiny shapes, fp16 - the timings mean nothing "
                "about GPU speed")
_STATUS_CELL = {"n/a": "n/a", "skipped": "-", "wrong": "WRONG", "error": "ERROR"}
INEXACT_MARK = "~"  # timed although it missed the tolerance (by design: FlashMLA's fp8 queries)
FP8_LABEL = ":fp8"


def row_label(row: dict[str, Any]) -> str:
    """The row's id, with ``:fp8`` for a row over an fp8 cache."""
    return row["row"] + (FP8_LABEL if row.get("kv_dtype") == "fp8" else "")


def _us(us: float) -> str:
    return f"{us:.0f}" if us >= 1000 else f"{us:.1f}"


_SHORT = {"ours_fn": "fn", "ours_default": "untuned"}


def _width(key: str) -> int:
    """A peer's column: its time (at least 10 characters, or its heading's)."""
    return max(10, len(_SHORT.get(key, key)) + 3)


def table_header(columns: list[str], name_width: int = 16) -> str:
    head = f"{'row':<{name_width}} {'ps':>3} {'ours µs':>9} {'GB/s':>7} {'TFLOP/s':>7} {'floor':>5}"
    for key in columns:
        if key == "ours":
            continue
        head += f" | {_SHORT.get(key, key) + ' µs':>{_width(key)}}"
        head += "" if key == "ours_fn" else f" {'x':>5}"
    return head


def _mark(e: dict[str, Any]) -> str:
    """The one-character marker after a time: ~ inexact, * timed without a graph."""
    return INEXACT_MARK if e.get("status") == "inexact" else "*" if e.get("method") == "cuda-events" else ""


def _cell(e: dict[str, Any], width: int = 9) -> str:
    if e.get("median_us") is None:
        return f"{_STATUS_CELL.get(e.get('status', ''), '?'):>{width}}"
    return f"{_us(e['median_us']):>{width - 1}}{_mark(e) or ' '}"


def _ratio(r: float | None) -> str:
    if r is None:
        return f"{'':>5}"
    return f"{r:>5.2f}" if r < 10 else f"{r:>5.1f}" if r < 100 else f"{r:>5.0f}"


def table_line(row: dict[str, Any], columns: list[str], name_width: int = 16) -> str:
    ours = row["impls"].get("ours", {})
    line = f"{row_label(row):<{name_width}} {row['page_size']:>3} {_cell(ours)}"
    if ours.get("median_us") is not None:
        line += f" {ours['gbps']:>7.0f} {ours['tflops']:>7.1f} {ours['floor_frac']:>5.2f}"
    else:
        line += f" {'':>7} {'':>7} {'':>5}"
    for key in columns:
        if key == "ours":
            continue
        e = row["impls"].get(key, {"status": "skipped"})
        line += f" | {_cell(e, _width(key))}"
        if key != "ours_fn":
            line += f" {_ratio(e.get('ours_over'))}"
    line += f"  [{row['seconds']:.1f}s]"
    if row.get("ours_bf16_us") is not None:
        line += f"  ours bf16 {_us(row['ours_bf16_us'])} µs"
    return line


EAGER_TITLE = ("eager per-call wall time, no graph (µs): back-to-back calls without a sync or L2 flush "
               "between them, median of batches; e/g = ours eager / ours graph time")


def eager_table(rows: list[dict[str, Any]], columns: list[str], name_width: int = 16) -> list[str]:
    """The second table: per (row, page size) each implementation's ``eager_us`` and ours' eager / graph
    ratio (above 1: the host's launch work, not the GPU, sets the pace of back-to-back calls)."""
    lines = ["", EAGER_TITLE,
             f"{'row':<{name_width}} {'ps':>3}" + "".join(f" {_SHORT.get(k, k):>9}" for k in columns)
             + f" | {'ours e/g':>8}"]
    for row in rows:
        line = f"{row_label(row):<{name_width}} {row['page_size']:>3}"
        for key in columns:
            e = row["impls"].get(key, {"status": "skipped"})
            us = e.get("eager_us")
            line += f" {_us(us):>9}" if us is not None else f" {_STATUS_CELL.get(e.get('status', ''), '-'):>9}"
        ours = row["impls"].get("ours", {})
        r = ratio(ours.get("eager_us"), ours.get("median_us"))
        lines.append(line + f" | {'' if r is None else f'{r:.2f}':>8}")
    return lines


FP8_TITLE = ("fp8 KV cache (float8_e4m3fn, per-tensor scales), µs: ours beside its bf16-cache time of the same "
             "run, the peers over the same fp8 cache; floor: ours' fraction of the floor, bytes counting the "
             "cache at 1 byte an element")
_NAMES = {"fa3": "fa3", "fa2": "fa2", "flashmla": "FlashMLA", "sglang": "SGLang", "torch": "torch"}


def _md_time(e: dict[str, Any] | None) -> str:
    if e is None:
        return "-"
    if e.get("median_us") is None:
        return _STATUS_CELL.get(e.get("status", ""), "?")
    return _us(e["median_us"]) + _mark(e)


def _md_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def fp8_table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The fp8 rows as a markdown table (stdout and bench_fp8.md): per (row, page size) ours' fp8 time,
    ours' bf16 time of the same run (when it ran both), their ratio, each peer of ``keys`` (the run's
    implementations with an fp8 path) with ours / peer, and ours' floor fraction; a footnote for the
    inexact entries. [] without fp8 rows."""
    fp8 = [r for r in rows if r.get("kv_dtype") == "fp8"]
    if not fp8:
        return []
    peers = [k for k in keys if k not in OURS]
    head = ["row", "ps", "ours fp8 µs", "ours bf16 µs", "fp8 / bf16"]
    for k in peers:
        head += [f"{_NAMES.get(k, k)} fp8 µs", f"ours / {_NAMES.get(k, k)}"]
    head.append("floor")
    lines = ["", FP8_TITLE, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    inexact: dict[str, list[float]] = {}
    for r in fp8:
        ours = r["impls"].get("ours", {})
        cells = [r["row"], str(r["page_size"]), _md_time(ours),
                 "-" if r.get("ours_bf16_us") is None else _us(r["ours_bf16_us"]),
                 _md_ratio(ratio(ours.get("median_us"), r.get("ours_bf16_us")))]
        for k in peers:
            e = r["impls"].get(k)
            cells += [_md_time(e), _md_ratio((e or {}).get("ours_over"))]
            if e is not None and e.get("status") == "inexact":
                inexact.setdefault(k, []).append(e.get("rel_err") or 0.0)
        cells.append("-" if ours.get("floor_frac") is None else f"{ours['floor_frac']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    for k, errs in inexact.items():
        lines += ["", f"{INEXACT_MARK} {_NAMES.get(k, k)}: missed the tolerance by design, timed all the same "
                      f"(relative error up to {max(errs):.3g}; bench.json's notes say where and by how much)"]
    return lines


def summary(doc: dict[str, Any]) -> list[str]:
    """What was skipped and why, what failed, where the check used a subset, and the graph marker."""
    lines: list[str] = []
    for key, meta in doc["impls"].items():
        if not meta["available"]:
            lines.append(f"skipped {key}: {meta['reason']}")
    by_note: dict[tuple[str, str, str], list[str]] = {}
    subset = []
    for row in doc["rows"]:
        tag = f"{row_label(row)} ps{row['page_size']}"
        if row["checked_seqs"] < row["batch"]:
            subset.append(f"{tag} ({row['checked_seqs']} of {row['batch']})")
        for key, e in row["impls"].items():
            if e["status"] != "skipped" and (e["status"] != "ok" or e.get("note")):
                by_note.setdefault((key, e["status"], e.get("note", "")), []).append(tag)
    labels = {"n/a": "not applicable", "wrong": "WRONG (failed the reference check, not timed)",
              "inexact": "INEXACT (missed the tolerance by design, timed; marked ~)", "error": "ERROR",
              "ok": "note"}
    for (key, status, note), tags in by_note.items():
        lines.append(f"{labels.get(status, status)}: {key} on {_tags(tags)}: {note}")
    if subset:
        lines.append(f"reference check on the first sequences only: {', '.join(subset)}")
    if any(e.get("method") == "cuda-events" for row in doc["rows"] for e in row["impls"].values()):
        lines.append("* timed with CUDA events without a graph (the call could not be graph-captured)")
    if doc["dry_run"]:
        lines.append(DRY_RUN_NOTE)
    return lines


def _tags(tags: list[str]) -> str:
    return ", ".join(tags) if len(tags) <= 4 else f"{len(tags)} rows ({tags[0]}, ..., {tags[-1]})"


def ours_ok(doc: dict[str, Any]) -> bool:
    """Did our implementation pass the check (and run) on every row where it applies?"""
    return all(row["impls"][k]["status"] in ("ok", "n/a") for row in doc["rows"] for k in OURS
               if k in row["impls"])





CSV_ENV = ("gpu", "gpu_key", "date", "torch", "triton", "cuda", "flashinfer", "flash_mla", "sglang")
CSV_ROW = ("row", "kind", "heads", "batch", "total_q", "kv_tokens", "page_size", "cache", "floor_us",
           "checked_seqs")
CSV_IMPL = ("impl", "status", "median_us", "p10_us", "p90_us", "runs", "method", "gbps", "tflops",
            "floor_frac", "ours_over", "rel_err", "lse_err", "eager_us", "eager_calls", "note")
CSV_FP8 = ("kv_dtype", "ours_bf16_us")  # after the older columns: the row's cache dtype, ours' bf16 time
CSV_COLUMNS = CSV_ENV + CSV_ROW + CSV_IMPL + CSV_FP8


def to_csv(doc: dict[str, Any]) -> str:
    """One line per (row, page size, implementation); the environment repeated on every line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    env = {k: doc["env"].get(k) for k in CSV_ENV}
    for row in doc["rows"]:
        base = {**env, **{k: row.get(k) for k in CSV_ROW}, "kv_dtype": row.get("kv_dtype", "bf16"),
                "ours_bf16_us": row.get("ours_bf16_us")}
        for key, e in row["impls"].items():
            writer.writerow({**base, "impl": key, **{k: e.get(k) for k in CSV_IMPL if k != "impl"}})
    return buf.getvalue()


def write_results(doc: dict[str, Any], folder: Path, figure: bool = True) -> tuple[list[Path], str]:
    """Write bench.json, bench.csv, bench_fp8.md (when fp8 rows ran) and (with matplotlib) bench.png into
    ``folder``.

    Returns (the files written, a message about the figure or "").
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "bench.json", folder / "bench.csv"]
    write_atomic(written[0], json.dumps(doc, indent=1) + "\n")
    write_atomic(written[1], to_csv(doc))
    table = fp8_table(doc["rows"], [k for k, meta in doc["impls"].items() if meta.get("fp8")])
    if table:
        env = doc["env"]
        title = (f"# mla-tune bench, fp8 KV cache: {env['gpu']}, {env['date'][:10]}, torch {env['torch']}, "
                 f"triton {env['triton']}" + "".join(f", {lib} {env[lib]}" for lib in ("flashinfer", "flash_mla")
                                                     if env.get(lib)))
        note = ["", DRY_RUN_NOTE] if doc["dry_run"] else []
        written.append(folder / "bench_fp8.md")
        write_atomic(written[-1], "\n".join([title, *note, *table]) + "\n")
    message = ""
    if figure:
        message = draw_figure(doc, folder / "bench.png")
        if not message:
            written.append(folder / "bench.png")
    return written, message


OURS_BF16 = "ours bf16"  # the figure's bar of an fp8 row's ours_bf16_us


def _fastest_peer(row: dict[str, Any]) -> float | None:
    times = [e["median_us"] for k, e in row["impls"].items() if k not in OURS and e.get("median_us")]
    return min(times) if times else None


def draw_figure(doc: dict[str, Any], path: Path) -> str:
    """Left: each implementation's time relative to the fastest peer, per row. Right: achieved FLOP/s
    against the roofline of the measured ceilings. Returns "" or why there is no figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no bench.png (pip install matplotlib, or the 'bench' extra)"
    rows = doc["rows"]
    keys = [k for k in doc["impls"] if k not in ("ours_fn", "ours_default")]
    if any(r.get("ours_bf16_us") for r in rows):  # fp8 rows: ours over the bf16 cache beside ours over fp8
        keys.insert(1, OURS_BF16)
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, max(5.0, 0.3 * len(rows) + 2)))
    height = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ys, xs = [], []
        for i, row in enumerate(rows):
            base = _fastest_peer(row) or row["impls"].get("ours", {}).get("median_us")
            us = row.get("ours_bf16_us") if key == OURS_BF16 else row["impls"].get(key, {}).get("median_us")
            if base and us:
                ys.append(i + (j - (len(keys) - 1) / 2) * height)
                xs.append(us / base)
        if xs:  # bars grow from 1; a tick marks each end (the fastest peer's own bar has no length)
            bars = left.barh(ys, [x - 1.0 for x in xs], height, left=1.0,
                             label="ours over the bf16 cache (fp8 rows)" if key == OURS_BF16 else key)
            left.scatter(xs, ys, marker="|", color=bars.patches[0].get_facecolor(), s=60)
    left.set_xscale("log")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_yticks(range(len(rows)), [f"{row_label(r)} ps{r['page_size']}" for r in rows], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("time / fastest peer's time (log; below 1: faster than every peer)")
    left.legend(fontsize=8)
    c = doc["ceilings"]
    bw, rate = c["copy_gbps"] * 1e9, c["matmul_tflops"] * 1e12
    intensity = [r["flops"] / r["bytes"] for r in rows]  # fp8 rows: the cache counted at 1 byte an element
    lo, hi = min(intensity + [rate / bw]) / 2, max(intensity + [rate / bw]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof = f"roofline: copy {c['copy_gbps'] / 1e3:.3g} TB/s, matmul {c['matmul_tflops']:.3g} TFLOP/s"
    right.plot(xs, [min(rate, bw * x) / 1e12 for x in xs], color="black", linewidth=1, label=roof)
    for key, marker in zip([k for k in keys if k != OURS_BF16], "o^sDvP*" * 2, strict=False):
        pts = [(r["flops"] / r["bytes"], r["impls"][key]["tflops"]) for r in rows
               if r["impls"].get(key, {}).get("tflops")]
        if pts:
            right.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key,
                          s=40 if key == "ours" else 20, zorder=3 if key == "ours" else 2)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("arithmetic intensity (FLOP / byte, as docs/contract.md counts them)")
    right.set_ylabel("achieved TFLOP/s")
    right.legend(fontsize=8)
    env = doc["env"]
    title = f"mla-tune bench: {env['gpu']}, {env['date'][:10]}, torch {env['torch']}, triton {env['triton']}"
    fig.suptitle(title + (f"\n{DRY_RUN_NOTE}" if doc["dry_run"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""





def load_results(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("tool") != "mla-tune bench":
        raise ValueError(f"{path}: expected an mla-tune bench results file (bench.json)")
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: expected schema {SCHEMA_VERSION}, found {doc.get('schema')}")
    return doc


def cache_layout(doc: dict[str, Any]) -> str:
    """The cache layout a results file was run with (files written before the setting: ``split``)."""
    return str(doc.get("settings", {}).get("cache_layout") or "split")


def kv_dtypes(doc: dict[str, Any]) -> list[str]:
    """The KV cache dtypes a results file ran (files written before the setting: bf16 only)."""
    return list(doc.get("settings", {}).get("kv_dtypes") or ["bf16"])


def compare(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> tuple[list[str], bool]:
    """Per (row, page size, implementation) present in both: committed and fresh median, deviation.

    Returns (report lines, whether ours stayed ok and within ``tolerance`` (a fraction) everywhere).
    """
    def index(doc: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
        return {(row_label(r), r["page_size"], k): e for r in doc["rows"] for k, e in r["impls"].items()}

    before, after = index(old), index(new)
    lines = [f"compare with {old['env']['gpu']} results of {old['env']['date']} (tolerance {tolerance:.0%}):"]
    if old["env"]["gpu_key"] != new["env"]["gpu_key"]:
        lines.append(f"warning: different GPU ({old['env']['gpu_key']} then, {new['env']['gpu_key']} now)")
    layouts = [cache_layout(d) for d in (old, new)]
    if layouts[0] != layouts[1]:
        lines.append(f"warning: different cache layout ({layouts[0]} then, {layouts[1]} now)")
    within = True
    width = max([len(k[0]) for k in after] + [4])
    lines.append(f"{'row':<{width}} {'ps':>3} {'impl':<8} {'then µs':>9} {'now µs':>9} {'change':>7}")
    for key, e in after.items():
        was = before.get(key)
        if was is None:
            continue
        then_us, now_us = was.get("median_us"), e.get("median_us")
        flag, change = "", ""
        if then_us and now_us:
            dev = now_us / then_us - 1
            change = f"{dev:+.1%}"
            flag = "  outside" if abs(dev) > tolerance else ""
        elif was["status"] != e["status"]:
            change, flag = "", f"  status {was['status']} -> {e['status']}"
        else:
            continue
        if flag and key[2] == "ours":
            within = False
        lines.append(f"{key[0]:<{width}} {key[1]:>3} {key[2]:<8} {_us(then_us) if then_us else '-':>9} "
                     f"{_us(now_us) if now_us else '-':>9} {change:>7}{flag}")
    lines.append("ours within tolerance on every row" if within else "ours OUTSIDE tolerance on some rows")
    return lines, within
