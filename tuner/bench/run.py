"""``mla-tune bench``: the tuned dispatch against the peers on the public benchmark set.

Per (row, page size): build the inputs once (:func:`tuner.harness.inputs.make_inputs`, fixed seed), compute
the float32 reference on the first sequences, then for every implementation: prepare (plan, layout
conversion: untimed), run once and check against the reference (relative Frobenius error < 1e-2, lse
within 1e-3 where it returns one), and only if it passes, time it with :func:`tuner.harness.timing.time_call`
(CUDA-graph replay of one call, L2 flushed before each call, median; a call that cannot be captured is
timed with events without a graph, and the table marks it). The floor of a row is
max(bytes / copy bandwidth, FLOPs / matmul rate), both ceilings measured in the same run.

Results: a table on stdout (streamed row by row), and ``bench.json`` / ``bench.csv`` / ``bench.png``
(``results/README.md`` describes them). :func:`compare` checks a fresh run against a committed one.
"""

from __future__ import annotations

import csv
import datetime
import gc
import io
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.harness.inputs import Inputs, Workload, benchmark_set, make_inputs
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref
from tuner.harness.timing import Timing, time_call
from tuner.runtime import paths
from tuner.runtime.config import DecodeConfig, PrefillConfig
from tuner.runtime.decode import MLADecode, mla_decode
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import untuned_config
from tuner.runtime.fileio import write_atomic
from tuner.runtime.loader import module_hash
from tuner.runtime.prefill import MLAPrefill, mla_prefill

from .peers import Impl, Prepared, all_peers, output_buffers

SCHEMA_VERSION = 1
REL_TOL = 1e-2  # relative Frobenius error of the output against the float32 reference
LSE_TOL = 1e-3  # absolute lse error (base 2)
DEFAULT_RUNS = 40
DEFAULT_WARMUP = 5
DEFAULT_CHECK_SEQS = 32
DRY_RUN_RUNS = 2
GPU_COPY_BYTES = 1 << 30
GPU_MATMUL_N = 8192
CPU_COPY_BYTES = 32 << 20
CPU_MATMUL_N = 256
OURS = ("ours", "ours_fn", "ours_default")  # plan/run (timed against the peers), one call, untuned default
DRY_RUN_NOTE = ("DRY RUN: Triton interpreter on the CPU, tiny shapes, fp16 - the timings mean nothing "
                "about GPU speed")

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Arithmetic: floors, rates, ratios
# ---------------------------------------------------------------------------------------------------

def floor_us(bytes_moved: float, flops: float, copy_bytes_per_s: float, matmul_flops_per_s: float) -> float:
    """The least time the row can take: max(bytes / copy bandwidth, FLOPs / matmul rate), in µs."""
    return max(bytes_moved / copy_bytes_per_s, flops / matmul_flops_per_s) * 1e6


def achieved(bytes_moved: float, flops: float, us: float) -> tuple[float, float]:
    """(GB/s, TFLOP/s) of a row that took ``us`` microseconds."""
    return bytes_moved / us * 1e-3, flops / us * 1e-6


def floor_fraction(floor: float, us: float) -> float:
    """floor / time: 1.0 is the measured ceiling."""
    return floor / us


def ratio(ours_us: float | None, peer_us: float | None) -> float | None:
    """ours / peer time (below 1: ours is faster); None when either is missing."""
    if ours_us is None or peer_us is None or peer_us <= 0:
        return None
    return ours_us / peer_us


@dataclass(frozen=True)
class Ceilings:
    """Measured in the run: device-to-device copy bandwidth (bytes read + written per second) and the
    matmul rate (FLOP/s) of an n^3 torch.matmul in the benchmark's dtype on random data."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int
    matmul_n: int


def measure_ceilings(device: torch.device, dtype: torch.dtype, runs: int) -> Ceilings:
    big = device.type == "cuda"
    n_bytes = GPU_COPY_BYTES if big else CPU_COPY_BYTES
    src = torch.full((n_bytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # Not in a CUDA graph: a captured device-to-device copy can become a memcpy node served by the copy
    # engines (measured 2.45 TB/s on the H100 against 3.0 TB/s for the copy kernel).
    t_copy = time_call(lambda: dst.copy_(src), device=device, runs=runs, warmup=3, graph=False, flush_l2=False)
    n = GPU_MATMUL_N if big else CPU_MATMUL_N
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty_like(a)
    t_mm = time_call(lambda: torch.matmul(a, b, out=c), device=device, runs=runs, warmup=3, flush_l2=False)
    return Ceilings(2 * n_bytes / (t_copy.median_us * 1e-6), 2 * n**3 / (t_mm.median_us * 1e-6), n_bytes, n)


# ---------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------

def reference_prefix(w: Workload, inp: Inputs, check_seqs: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float32 reference (output [rows, H, ckv], lse [rows, H]) of the first ``check_seqs`` sequences
    (all when 0 or more than the batch), and how many sequences that is."""
    n = w.batch if check_seqs <= 0 else min(w.batch, check_seqs)
    last = inp.kv_last_page_len[:n]
    if inp.qo_indptr is None:
        out, lse = mla_decode_ref(inp.q_nope[:n], inp.q_pe[:n], inp.ckv_cache, inp.kpe_cache,
                                  inp.kv_indptr[: n + 1], inp.kv_indices, inp.sm_scale, last)
    else:
        rows = int(inp.qo_indptr[n])
        out, lse = mla_prefill_ref(inp.q_nope[:rows], inp.q_pe[:rows], inp.ckv_cache, inp.kpe_cache,
                                   inp.qo_indptr[: n + 1], inp.kv_indptr[: n + 1], inp.kv_indices,
                                   inp.sm_scale, last, causal=w.causal)
    return out, lse, n


def check_output(out: torch.Tensor, lse: torch.Tensor | None, ref_out: torch.Tensor,
                 ref_lse: torch.Tensor) -> tuple[bool, float | None, float | None, str]:
    """Compare the first ``ref_out.shape[0]`` rows with the reference.

    Returns (passed, relative Frobenius error, max |lse error| or None, what failed).
    """
    rows = ref_out.shape[0]
    o = out[:rows].float()
    if not bool(torch.isfinite(o).all()):
        return False, None, None, "non-finite values in the output"
    diff, norm = float((o - ref_out).norm()), float(ref_out.norm())
    rel = diff / norm if norm > 0 else diff
    lse_err = None
    if lse is not None:
        got = lse[:rows].float()
        seen = torch.isfinite(ref_lse)
        if bool((torch.isfinite(got) != seen).any()):
            return False, rel, None, "lse finite where the reference is -inf, or the reverse"
        lse_err = float((got[seen] - ref_lse[seen]).abs().max()) if bool(seen.any()) else 0.0
    problems = []
    if rel >= REL_TOL:
        problems.append(f"relative error {rel:.2e} >= {REL_TOL:.0e}")
    if lse_err is not None and lse_err >= LSE_TOL:
        problems.append(f"lse error {lse_err:.2e} >= {LSE_TOL:.0e}")
    return not problems, rel, lse_err, "; ".join(problems)


# ---------------------------------------------------------------------------------------------------
# Our implementation, as two Impl adapters (no explicit config: the dispatch table decides)
# ---------------------------------------------------------------------------------------------------

class OursPlanRun(Impl):
    """MLADecode / MLAPrefill: plan() once (the host work), time run(). ``default``: with the default
    config instead of the tuned dispatch (what tuning gained, in the same run)."""

    key = "ours"
    label = "mla-tuner MLADecode / MLAPrefill plan + run (tuned dispatch)"

    def __init__(self, default: bool = False) -> None:
        self.default = default
        if default:
            self.key = "ours_default"
            self.label = "mla-tuner MLADecode / MLAPrefill plan + run (default config, untuned)"

    def _config(self, w: Workload, inp: Inputs, page_size: int) -> DecodeConfig | PrefillConfig | None:
        if not self.default:
            return None
        return untuned_config(w.spec(page_size), w.total_q, w.avg_kv_len, gpu_info(inp.q_nope.device))

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        shape = dict(num_heads=w.heads, page_size=page_size, sm_scale=inp.sm_scale,
                     head_dim_ckv=w.head_dim_ckv, head_dim_kpe=w.head_dim_kpe,
                     num_pages=inp.ckv_cache.shape[0], config=self._config(w, inp, page_size))
        plan: MLADecode | MLAPrefill
        if inp.qo_indptr is None:
            plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, **shape)
        else:
            plan = MLAPrefill().plan(inp.qo_indptr, inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len,
                                     causal=w.causal, **shape)
        assert plan.spec is not None and plan.config is not None
        out, lse = output_buffers(inp)
        q_nope, q_pe, ckv, kpe = inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache
        info = {"kernel": plan.spec.name(), "config": plan.config.to_dict(),
                "module_hash": module_hash(plan.spec)}
        return Prepared(lambda: plan.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse), info)


class OursFunctional(Impl):
    """mla_decode / mla_prefill: the one-call form (its config comes from the host-known average)."""

    key = "ours_fn"
    label = "mla-tuner mla_decode / mla_prefill one call"

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        out, lse = output_buffers(inp)
        common = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache)
        if inp.qo_indptr is None:
            args = (*common, inp.kv_indptr, inp.kv_indices, inp.sm_scale, inp.kv_last_page_len)
            return Prepared(lambda: mla_decode(*args, out=out, lse=lse))
        args = (*common, inp.qo_indptr, inp.kv_indptr, inp.kv_indices, inp.sm_scale, inp.kv_last_page_len)
        return Prepared(lambda: mla_prefill(*args, causal=w.causal, out=out, lse=lse))


def implementations(peer_keys: list[str]) -> dict[str, Impl]:
    """Ours (both forms) first, then the chosen peers in table order."""
    peers = all_peers()
    unknown = [k for k in peer_keys if k not in peers]
    if unknown:
        raise ValueError(f"peers: unknown {unknown}; expected some of {list(peers)}")
    impls: dict[str, Impl] = {"ours": OursPlanRun(), "ours_fn": OursFunctional(), "ours_default": OursPlanRun(True)}
    impls.update({k: p for k, p in peers.items() if k in peer_keys})
    return impls


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    runs: int
    warmup: int
    check_seqs: int
    seed: int
    dry_run: bool


def _time(fn: Callable[[], object], s: Settings) -> tuple[Timing, str, str]:
    """time_call with a CUDA graph; if capture fails, CUDA events without a graph (and say so).

    Returns (timing, method: "cuda-graph" | "cuda-events" | "wall-clock", note).
    """
    if s.device.type != "cuda":
        return time_call(fn, device=s.device, runs=s.runs, warmup=s.warmup), "wall-clock", ""
    try:
        return time_call(fn, device=s.device, runs=s.runs, warmup=s.warmup, graph=True), "cuda-graph", ""
    except Exception as err:  # noqa: BLE001 - capture can fail in many ways; the note says which
        torch.cuda.synchronize(s.device)
        note = f"graph capture failed ({_describe(err)}): timed with events, no graph"
        return time_call(fn, device=s.device, runs=s.runs, warmup=s.warmup, graph=False), "cuda-events", note


def _sig(x: float | None, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (keeps the committed JSON readable); None if not finite."""
    return float(f"{x:.{digits}g}") if x is not None and math.isfinite(x) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_impl(impl: Impl, w: Workload, inp: Inputs, page_size: int, ref: tuple[torch.Tensor, torch.Tensor],
             s: Settings) -> dict[str, Any]:
    """Prepare, check and (if correct) time one implementation on one row: its result entry."""
    entry: dict[str, Any] = {"status": "ok", "note": ""}
    prepared = impl.prepare(w, inp, page_size)
    entry["info"] = prepared.info
    out, lse = prepared.call()
    _sync(s.device)
    passed, rel, lse_err, problem = check_output(out, lse if impl.returns_lse else None, *ref)
    entry.update(rel_err=_sig(rel, 3), lse_err=_sig(lse_err, 3))
    if not passed:
        entry.update(status="wrong", note=problem)
        return entry
    timing, method, note = _time(prepared.call, s)
    entry.update(median_us=_sig(timing.median_us, 5), p10_us=_sig(timing.p10_us, 5),
                 p90_us=_sig(timing.p90_us, 5), runs=timing.runs, method=method, note=note)
    return entry


def _derive(row: dict[str, Any]) -> None:
    """Add GB/s, TFLOP/s, floor fraction and ours/impl ratios to a row's entries."""
    ours = row["impls"].get("ours", {}).get("median_us")
    for key, e in row["impls"].items():
        us = e.get("median_us")
        if us is None:
            continue
        gbps, tflops = achieved(row["bytes"], row["flops"], us)
        e.update(gbps=_sig(gbps), tflops=_sig(tflops), floor_frac=_sig(floor_fraction(row["floor_us"], us)))
        if key != "ours":
            e["ours_over"] = _sig(ratio(ours, us))


def _kind(w: Workload) -> str:
    return w.spec(1).variant


def bench_row(w: Workload, page_size: int, impls: dict[str, Impl], reasons: dict[str, str], worked: set[str],
              ceilings: Ceilings, s: Settings, log: Log) -> dict[str, Any]:
    """One (row, page size): inputs, reference, every implementation; the row's result entry.

    A peer that fails before it has ever worked is added to ``reasons`` and not tried again (a broken
    install or JIT would otherwise cost its load time on every row); ``worked`` holds those that ran.
    """
    t0 = time.perf_counter()
    inp = make_inputs(w, page_size, s.dtype, s.device, s.seed)
    ref_out, ref_lse, checked = reference_prefix(w, inp, s.check_seqs)
    bytes_moved, flops = w.bytes_moved(torch.empty(0, dtype=s.dtype).element_size()), w.flops()
    row: dict[str, Any] = {
        "row": w.name, "kind": _kind(w), "heads": w.heads, "batch": w.batch, "total_q": w.total_q,
        "kv_tokens": sum(w.kv_lens), "page_size": page_size, "bytes": bytes_moved, "flops": flops,
        "floor_us": _sig(floor_us(bytes_moved, flops, ceilings.copy_bytes_per_s,
                                  ceilings.matmul_flops_per_s)),
        "checked_seqs": checked, "impls": {},
    }
    if w.name not in known_rows(s.dry_run) and w.name not in known_rows(not s.dry_run):
        row["workload"] = _workload_dict(w)
    for key, impl in impls.items():
        if key in reasons:
            row["impls"][key] = {"status": "skipped", "note": reasons[key]}
            continue
        why = impl.not_applicable(w, page_size)
        if why:
            row["impls"][key] = {"status": "n/a", "note": why}
            continue
        t_impl = time.perf_counter()
        try:
            row["impls"][key] = run_impl(impl, w, inp, page_size, (ref_out, ref_lse), s)
        except Exception as err:  # noqa: BLE001 - a failing implementation is reported, never fatal
            _sync_quietly(s.device)
            msg = _describe(err)
            row["impls"][key] = {"status": "error", "note": msg}
            if key not in OURS and key not in worked:
                reasons[key] = f"failed on first use ({msg})"
                log(f"  {key}: {msg}; not tried on later rows")
        else:
            worked.add(key)
        setup_s = time.perf_counter() - t_impl
        if setup_s > 10:
            log(f"  ({key} took {setup_s:.0f}s on {w.name} ps{page_size}: first-use compilation or JIT load)")
    _derive(row)
    del inp, ref_out, ref_lse
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _describe(err: BaseException) -> str:
    """The exception's type and the first line of its message (at most 300 characters)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _sync_quietly(device: torch.device) -> None:
    try:
        _sync(device)
    except Exception:  # noqa: BLE001 - a sticky CUDA error surfaces again on the next row
        pass


def environment(device: torch.device, impls: dict[str, Impl], reasons: dict[str, str]) -> dict[str, Any]:
    """GPU identity, versions (torch, triton, CUDA, peers present), the date and the checkout's commit."""
    import triton

    from tuner import __version__

    info = gpu_info(device)
    env: dict[str, Any] = {
        "gpu": info.name, "gpu_key": info.key, "capability": info.capability, "num_sms": info.num_sms,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "mla_tuner": __version__, "git": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, impl in impls.items():
        if impl.library and impl.library not in env and key not in reasons:
            env[impl.library] = impl.version()
    return env


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=paths.REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def run_bench(rows: list[Workload], page_sizes: list[int], peer_keys: list[str], s: Settings,
              skip: dict[str, str] | None = None, log: Log = print) -> dict[str, Any]:
    """Run the benchmark; print the table as it goes; return the results document (``bench.json``).

    ``skip``: peers not to run, with the reason to report (the dry run skips all but PyTorch).
    """
    impls = implementations(peer_keys)
    reasons = dict(skip or {})
    for key, impl in impls.items():
        why = reasons.get(key) or impl.unavailable(s.device, s.dtype)
        if why:
            reasons[key] = why
    env = environment(s.device, impls, reasons)
    if s.dry_run:
        log(DRY_RUN_NOTE)
    log(f"mla-tune bench on {env['gpu']} ({env['gpu_key']}): torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}" + "".join(f", {lib} {env[lib]}" for lib in ("flashinfer", "sglang")
                                         if env.get(lib)))
    for key, why in reasons.items():
        log(f"skipped: {key} ({why})")
    ceilings = measure_ceilings(s.device, s.dtype, max(s.runs, 5))
    log(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, {str(s.dtype).removeprefix('torch.')} "
        f"matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s; floor = max(bytes / copy, FLOPs / matmul)")
    how = ("CUDA-graph replay of one call, L2 flushed before each call" if s.device.type == "cuda"
           else "wall clock of one call")
    log(f"timing: {how}, median of {s.runs} runs; x = ours time / peer time (below 1: ours is faster)")
    columns = [k for k in impls]
    name_width = max([len(w.name) for w in rows] + [4])
    log(table_header(columns, name_width))
    results = []
    worked: set[str] = set()
    for w in rows:
        for ps in page_sizes:
            row = bench_row(w, ps, impls, reasons, worked, ceilings, s, log)
            results.append(row)
            log(table_line(row, columns, name_width))
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "tool": "mla-tune bench", "dry_run": s.dry_run,
        "note": DRY_RUN_NOTE if s.dry_run else "", "env": env,
        "ceilings": {"copy_gbps": _sig(ceilings.copy_bytes_per_s / 1e9),
                     "matmul_tflops": _sig(ceilings.matmul_flops_per_s / 1e12),
                     "copy_bytes": ceilings.copy_bytes, "matmul_n": ceilings.matmul_n},
        "settings": {"dtype": str(s.dtype).removeprefix("torch."), "runs": s.runs, "warmup": s.warmup,
                     "seed": s.seed, "check_seqs": s.check_seqs, "page_sizes": page_sizes,
                     "rel_tol": REL_TOL, "lse_tol": LSE_TOL, "l2_flush": True},
        "impls": {k: {"label": impl.label, "available": k not in reasons, "reason": reasons.get(k),
                      "returns_lse": impl.returns_lse} for k, impl in impls.items()},
        "rows": results,
    }
    return doc


# ---------------------------------------------------------------------------------------------------
# Table and summary
# ---------------------------------------------------------------------------------------------------

_STATUS_CELL = {"n/a": "n/a", "skipped": "-", "wrong": "WRONG", "error": "ERROR"}


def _us(us: float) -> str:
    return f"{us:.0f}" if us >= 1000 else f"{us:.1f}"


_SHORT = {"ours_fn": "fn", "ours_default": "untuned"}


def table_header(columns: list[str], name_width: int = 16) -> str:
    head = f"{'row':<{name_width}} {'ps':>3} {'ours µs':>9} {'GB/s':>7} {'TFLOP/s':>7} {'floor':>5}"
    for key in columns:
        if key == "ours":
            continue
        head += f" | {_SHORT.get(key, key) + ' µs':>10}"
        head += "" if key == "ours_fn" else f" {'x':>5}"
    return head


def _cell(e: dict[str, Any], width: int = 9) -> str:
    if e.get("median_us") is None:
        return f"{_STATUS_CELL.get(e.get('status', ''), '?'):>{width}}"
    return f"{_us(e['median_us']):>{width - 1}}{'*' if e.get('method') == 'cuda-events' else ' '}"


def _ratio(r: float | None) -> str:
    if r is None:
        return f"{'':>5}"
    return f"{r:>5.2f}" if r < 10 else f"{r:>5.1f}" if r < 100 else f"{r:>5.0f}"


def table_line(row: dict[str, Any], columns: list[str], name_width: int = 16) -> str:
    ours = row["impls"].get("ours", {})
    line = f"{row['row']:<{name_width}} {row['page_size']:>3} {_cell(ours)}"
    if ours.get("median_us") is not None:
        line += f" {ours['gbps']:>7.0f} {ours['tflops']:>7.1f} {ours['floor_frac']:>5.2f}"
    else:
        line += f" {'':>7} {'':>7} {'':>5}"
    for key in columns:
        if key == "ours":
            continue
        e = row["impls"].get(key, {"status": "skipped"})
        line += f" | {_cell(e, 10)}"
        if key != "ours_fn":
            line += f" {_ratio(e.get('ours_over'))}"
    return line + f"  [{row['seconds']:.1f}s]"


def summary(doc: dict[str, Any]) -> list[str]:
    """What was skipped and why, what failed, where the check used a subset, and the graph marker."""
    lines: list[str] = []
    for key, meta in doc["impls"].items():
        if not meta["available"]:
            lines.append(f"skipped {key}: {meta['reason']}")
    by_note: dict[tuple[str, str, str], list[str]] = {}
    subset = []
    for row in doc["rows"]:
        tag = f"{row['row']} ps{row['page_size']}"
        if row["checked_seqs"] < row["batch"]:
            subset.append(f"{tag} ({row['checked_seqs']} of {row['batch']})")
        for key, e in row["impls"].items():
            if e["status"] != "skipped" and (e["status"] != "ok" or e.get("note")):
                by_note.setdefault((key, e["status"], e.get("note", "")), []).append(tag)
    labels = {"n/a": "not applicable", "wrong": "WRONG (failed the reference check, not timed)",
              "error": "ERROR", "ok": "note"}
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
    """Did our implementation pass the check (and run) on every row?"""
    return all(row["impls"][k]["status"] == "ok" for row in doc["rows"] for k in OURS if k in row["impls"])


# ---------------------------------------------------------------------------------------------------
# Files: bench.json, bench.csv, bench.png
# ---------------------------------------------------------------------------------------------------

CSV_ENV = ("gpu", "gpu_key", "date", "torch", "triton", "cuda", "flashinfer", "sglang")
CSV_ROW = ("row", "kind", "heads", "batch", "total_q", "kv_tokens", "page_size", "floor_us", "checked_seqs")
CSV_IMPL = ("impl", "status", "median_us", "p10_us", "p90_us", "runs", "method", "gbps", "tflops",
            "floor_frac", "ours_over", "rel_err", "lse_err", "note")
CSV_COLUMNS = CSV_ENV + CSV_ROW + CSV_IMPL


def to_csv(doc: dict[str, Any]) -> str:
    """One line per (row, page size, implementation); the environment repeated on every line."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    env = {k: doc["env"].get(k) for k in CSV_ENV}
    for row in doc["rows"]:
        base = {**env, **{k: row[k] for k in CSV_ROW}}
        for key, e in row["impls"].items():
            writer.writerow({**base, "impl": key, **{k: e.get(k) for k in CSV_IMPL if k != "impl"}})
    return buf.getvalue()


def write_results(doc: dict[str, Any], folder: Path, figure: bool = True) -> tuple[list[Path], str]:
    """Write bench.json, bench.csv and (with matplotlib) bench.png into ``folder``.

    Returns (the files written, a message about the figure or "").
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "bench.json", folder / "bench.csv"]
    write_atomic(written[0], json.dumps(doc, indent=1) + "\n")
    write_atomic(written[1], to_csv(doc))
    message = ""
    if figure:
        message = draw_figure(doc, folder / "bench.png")
        if not message:
            written.append(folder / "bench.png")
    return written, message


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, max(5.0, 0.3 * len(rows) + 2)))
    height = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ys, xs = [], []
        for i, row in enumerate(rows):
            base = _fastest_peer(row) or row["impls"].get("ours", {}).get("median_us")
            us = row["impls"].get(key, {}).get("median_us")
            if base and us:
                ys.append(i + (j - (len(keys) - 1) / 2) * height)
                xs.append(us / base)
        if xs:  # bars grow from 1; a tick marks each end (the fastest peer's own bar has no length)
            bars = left.barh(ys, [x - 1.0 for x in xs], height, left=1.0, label=key)
            left.scatter(xs, ys, marker="|", color=bars.patches[0].get_facecolor(), s=60)
    left.set_xscale("log")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_yticks(range(len(rows)), [f"{r['row']} ps{r['page_size']}" for r in rows], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("time / fastest peer's time (log; below 1: faster than every peer)")
    left.legend(fontsize=8)
    c = doc["ceilings"]
    bw, rate = c["copy_gbps"] * 1e9, c["matmul_tflops"] * 1e12
    intensity = [r["flops"] / r["bytes"] for r in rows]
    lo, hi = min(intensity + [rate / bw]) / 2, max(intensity + [rate / bw]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof = f"roofline: copy {c['copy_gbps'] / 1e3:.3g} TB/s, matmul {c['matmul_tflops']:.3g} TFLOP/s"
    right.plot(xs, [min(rate, bw * x) / 1e12 for x in xs], color="black", linewidth=1, label=roof)
    for key, marker in zip(keys, "o^sDvP*" * 2, strict=False):
        pts = [(r["flops"] / r["bytes"], r["impls"][key]["tflops"]) for r in rows
               if r["impls"].get(key, {}).get("tflops")]
        if pts:
            right.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key,
                          s=40 if key == "ours" else 20, zorder=3 if key == "ours" else 2)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("arithmetic intensity (FLOP / byte, as mla_paged.md counts them)")
    right.set_ylabel("achieved TFLOP/s")
    right.legend(fontsize=8)
    env = doc["env"]
    title = f"mla-tune bench: {env['gpu']}, {env['date'][:10]}, torch {env['torch']}, triton {env['triton']}"
    fig.suptitle(title + (f"\n{DRY_RUN_NOTE}" if doc["dry_run"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


# ---------------------------------------------------------------------------------------------------
# Compare with committed results
# ---------------------------------------------------------------------------------------------------

def load_results(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("tool") != "mla-tune bench":
        raise ValueError(f"{path}: expected an mla-tune bench results file (bench.json)")
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: expected schema {SCHEMA_VERSION}, found {doc.get('schema')}")
    return doc


def compare(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> tuple[list[str], bool]:
    """Per (row, page size, implementation) present in both: committed and fresh median, deviation.

    Returns (report lines, whether ours stayed ok and within ``tolerance`` (a fraction) everywhere).
    """
    def index(doc: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
        return {(r["row"], r["page_size"], k): e for r in doc["rows"] for k, e in r["impls"].items()}

    before, after = index(old), index(new)
    lines = [f"compare with {old['env']['gpu']} results of {old['env']['date']} (tolerance {tolerance:.0%}):"]
    if old["env"]["gpu_key"] != new["env"]["gpu_key"]:
        lines.append(f"warning: different GPU ({old['env']['gpu_key']} then, {new['env']['gpu_key']} now)")
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
