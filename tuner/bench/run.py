"""``mla-tune bench``: the tuned dispatch against the peers on the public benchmark set.

Per (row, page size): build the inputs once (:func:`tuner.harness.inputs.make_inputs`, fixed seed), compute
the float32 reference on the first sequences, then for every implementation: prepare (plan, layout
conversion: untimed), run once and check against the reference by the one correctness rule
(:mod:`tuner.harness.check`; the lse too where it returns one), and only if it passes, time it with
:func:`tuner.harness.timing.time_call` (CUDA-graph replay of one call, L2 flushed before each call,
median; a call that cannot be captured is timed with events without a graph, and the table marks it),
and on CUDA also eagerly with :func:`tuner.harness.timing.time_eager` (wall time per call of back-to-back
calls, no graph: ``eager_us``). The floor of a row is max(bytes / copy bandwidth, FLOPs / matmul rate),
both ceilings measured in the same run.

A row runs at the bench's page sizes, or only at its own (``Workload.page_size``: the off-table rows).
Cache layout (``Settings.cache_layout``): ``auto`` builds the caches at page size 64 as the two column
views of one [pages, 64, ckv + kpe] tensor, so that ours, FlashInfer, FlashMLA and SGLang all read the
same memory there, and as two tensors at other page sizes; ``split`` and ``fused`` use one layout
everywhere.

KV cache dtype (``Settings.kv_dtypes``): ``bf16`` rows keep the cache in the query dtype; ``fp8`` rows
quantize the same values to float8_e4m3fn with per-tensor scales (``make_inputs(..., kv_dtype=FP8)``) and
run the implementations with an fp8 path (:attr:`tuner.bench.peers.Impl.fp8`; the others are ``n/a``),
checked against the float32 reference over the dequantized cache; their bytes count the cache at one byte
an element. With both, a row's fp8 entry follows its bf16 one and carries ours' bf16 time
(``ours_bf16_us``). A peer that quantizes more than the cache (FlashMLA's fp8 queries) may miss the
tolerance by design: if its output is otherwise well formed it is timed all the same, as ``inexact``.

Results: a table on stdout (streamed row by row), and ``bench.json`` / ``bench.csv`` / ``bench.png``
(``results/README.md`` describes them). :func:`compare` checks a fresh run against a committed one.
"""

from __future__ import annotations

import datetime
import gc
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tuner.harness.check import Tolerance, check, tolerance_for
from tuner.harness.floors import Ceilings, achieved, floor_fraction, floor_us, measure_ceilings, ratio
from tuner.harness.inputs import FP8, Inputs, Workload, make_inputs
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref
from tuner.harness.timing import EAGER_BATCHES, EAGER_CALLS, EAGER_MIN_CALLS, Timing, time_call, time_eager
from tuner.runtime import paths
from tuner.runtime.device import gpu_info

from .ours import implementations
from .peers import Impl, NotApplicable
from .report import DRY_RUN_NOTE, OURS, SCHEMA_VERSION, eager_table, fp8_table, table_header, table_line
from .rows import _workload_dict, known_rows, page_sizes_of

DEFAULT_RUNS = 40
DEFAULT_WARMUP = 5
DEFAULT_CHECK_SEQS = 32
DRY_RUN_RUNS = 2
CACHE_LAYOUTS = ("auto", "split", "fused")
FUSED_PAGE_SIZE = 64  # "auto": the page size where FlashMLA runs
KV_DTYPES = {"bf16": None, "fp8": FP8}  # a row's cache: the query dtype (make_inputs' None), or fp8
WELL_FORMED = Tolerance(atol=math.inf, rtol=math.inf, lse=math.inf)  # the check without its tolerance

Log = Callable[[str], None]


def reference_prefix(w: Workload, inp: Inputs, check_seqs: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float32 reference (output [rows, H, ckv], lse [rows, H]) of the first ``check_seqs`` sequences
    (all when 0 or more than the batch), and how many sequences that is."""
    n = w.batch if check_seqs <= 0 else min(w.batch, check_seqs)
    last = inp.kv_last_page_len[:n]
    if inp.qo_indptr is None:
        out, lse = mla_decode_ref(inp.q_nope[:n], inp.q_pe[:n], inp.ckv_cache, inp.kpe_cache,
                                  inp.kv_indptr[: n + 1], inp.kv_indices, inp.sm_scale, last, **inp.scales)
    else:
        rows = int(inp.qo_indptr[n])
        out, lse = mla_prefill_ref(inp.q_nope[:rows], inp.q_pe[:rows], inp.ckv_cache, inp.kpe_cache,
                                   inp.qo_indptr[: n + 1], inp.kv_indptr[: n + 1], inp.kv_indices,
                                   inp.sm_scale, last, causal=w.causal, **inp.scales)
    return out, lse, n


def check_output(out: torch.Tensor, lse: torch.Tensor | None, ref_out: torch.Tensor,
                 ref_lse: torch.Tensor) -> tuple[bool, float | None, float | None, str]:
    """Compare the first ``ref_out.shape[0]`` rows with the reference by the correctness rule
    (:mod:`tuner.harness.check`). Returns (passed, relative Frobenius error, max |lse error| or None,
    what failed)."""
    v = check(out, lse, ref_out, ref_lse)
    return v.passed, v.rel_err, v.lse_err, v.reason


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    runs: int
    warmup: int
    check_seqs: int
    seed: int
    dry_run: bool
    eager: bool = False  # also time_eager every implementation (the bench does on CUDA)
    cache_layout: str = "auto"  # CACHE_LAYOUTS
    kv_dtypes: tuple[str, ...] = ("bf16",)  # keys of KV_DTYPES, in the order each row runs them


def fused_at(layout: str, page_size: int) -> bool:
    """Whether the caches are column views of one tensor at this page size under ``layout``."""
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout: expected one of {list(CACHE_LAYOUTS)}, found {layout!r}")
    return layout == "fused" or (layout == "auto" and page_size == FUSED_PAGE_SIZE)


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
    out, lse = prepared.outputs()
    _sync(s.device)
    lse = lse if impl.returns_lse else None
    passed, rel, lse_err, problem = check_output(out, lse, *ref)
    entry.update(rel_err=_sig(rel, 3), lse_err=_sig(lse_err, 3))
    if not passed:
        why = impl.inexact(inp)
        if why is None or not check(out, lse, *ref, tol=WELL_FORMED):
            entry.update(status="wrong", note=problem)
            return entry
        entry.update(status="inexact", note=f"{why}: {problem}")  # missed the tolerance only: timed
    timing, method, note = _time(prepared.call, s)
    entry.update(median_us=_sig(timing.median_us, 5), p10_us=_sig(timing.p10_us, 5),
                 p90_us=_sig(timing.p90_us, 5), runs=timing.runs, method=method,
                 note="; ".join(n for n in (entry["note"], note) if n))
    if s.eager and impl.eager:
        eager = time_eager(prepared.call, device=s.device, warmup=s.warmup)
        entry.update(eager_us=_sig(eager.median_us, 5), eager_calls=eager.calls)
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
              ceilings: Ceilings, s: Settings, log: Log, kv_dtype: str = "bf16") -> dict[str, Any]:
    """One (row, page size, KV cache dtype): inputs, reference, every implementation; the row's result
    entry.

    A peer that fails before it has ever worked is added to ``reasons`` and not tried again (a broken
    install or JIT would otherwise cost its load time on every row); ``worked`` holds those that ran.
    """
    t0 = time.perf_counter()
    fused = fused_at(s.cache_layout, page_size)
    cache_dtype = KV_DTYPES[kv_dtype]
    inp = make_inputs(w, page_size, s.dtype, s.device, s.seed, fused=fused, kv_dtype=cache_dtype)
    ref_out, ref_lse, checked = reference_prefix(w, inp, s.check_seqs)
    itemsize = torch.empty(0, dtype=s.dtype).element_size()
    bytes_moved, flops = w.bytes_moved(itemsize, inp.ckv_cache.element_size()), w.flops()
    row: dict[str, Any] = {
        "row": w.name, "kind": _kind(w), "heads": w.heads, "batch": w.batch, "total_q": w.total_q,
        "kv_tokens": sum(w.kv_lens), "page_size": page_size, "cache": "fused" if fused else "split",
        "kv_dtype": kv_dtype, "bytes": bytes_moved, "flops": flops,
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
        if cache_dtype is not None and not impl.fp8:
            why = f"16-bit cache only (no {kv_dtype} path)"
        if why:
            row["impls"][key] = {"status": "n/a", "note": why}
            continue
        t_impl = time.perf_counter()
        try:
            row["impls"][key] = run_impl(impl, w, inp, page_size, (ref_out, ref_lse), s)
        except NotApplicable as err:
            row["impls"][key] = {"status": "n/a", "note": str(err)}
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

    from tuner.runtime import __version__

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


def _layout_words(layout: str) -> str:
    if layout == "auto":
        return (f"at page size {FUSED_PAGE_SIZE} one [pages, {FUSED_PAGE_SIZE}, ckv + kpe] tensor that every "
                "implementation reads (ours and FlashInfer through its two column views), two tensors elsewhere")
    if layout == "fused":
        return "one [pages, page size, ckv + kpe] tensor (ours and FlashInfer read its two column views)"
    return "two tensors, ckv and kpe (FlashMLA and SGLang read a concatenated copy)"


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
        f"CUDA {env['cuda']}" + "".join(f", {lib} {env[lib]}" for lib in ("flashinfer", "flash_mla", "sglang")
                                         if env.get(lib)))
    if reasons:  # the reasons come once, in the summary after the table
        log(f"skipped: {', '.join(reasons)}")
    ceilings = measure_ceilings(s.device, s.dtype, max(s.runs, 5))
    log(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, {str(s.dtype).removeprefix('torch.')} "
        f"matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s; floor = max(bytes / copy, FLOPs / matmul)")
    how = ("CUDA-graph replay of one call, L2 flushed before each call" if s.device.type == "cuda"
           else "wall clock of one call")
    log(f"timing: {how}, median of {s.runs} runs; x = ours time / peer time (below 1: ours is faster)")
    log(f"caches: {_layout_words(s.cache_layout)}")
    if "fp8" in s.kv_dtypes:
        log("fp8 rows (id:fp8): the caches in float8_e4m3fn, per-tensor scales amax / 448 (one for both in the "
            "fused layout), queries in the input dtype; bytes count the cache at 1 byte an element")
    columns = [k for k in impls]
    name_width = max([len(w.name) + (4 if "fp8" in s.kv_dtypes else 0) for w in rows] + [4])
    log(table_header(columns, name_width))
    results = []
    worked: set[str] = set()
    for w in rows:
        for ps in page_sizes_of(w, page_sizes):
            ours_16bit = None
            for kv in s.kv_dtypes:
                row = bench_row(w, ps, impls, reasons, worked, ceilings, s, log, kv)
                if kv == "bf16":
                    ours_16bit = row["impls"].get("ours", {}).get("median_us")
                elif "bf16" in s.kv_dtypes:
                    row["ours_bf16_us"] = ours_16bit
                results.append(row)
                log(table_line(row, columns, name_width))
    if s.eager:
        for line in eager_table(results, [k for k in columns if impls[k].eager], name_width):
            log(line)
    else:
        log("eager per-call time: not measured (" + ("CUDA only: a dry run times single calls by wall clock"
                                                     if s.device.type != "cuda" else "--no-eager") + ")")
    if "fp8" in s.kv_dtypes:
        for line in fp8_table(results, [k for k, impl in impls.items() if impl.fp8]):
            log(line)
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "tool": "mla-tune bench", "dry_run": s.dry_run,
        "note": DRY_RUN_NOTE if s.dry_run else "", "env": env,
        "ceilings": {"copy_gbps": _sig(ceilings.copy_bytes_per_s / 1e9),
                     "matmul_tflops": _sig(ceilings.matmul_flops_per_s / 1e12),
                     "copy_bytes": ceilings.copy_bytes, "matmul_n": ceilings.matmul_n},
        "settings": {"dtype": str(s.dtype).removeprefix("torch."), "runs": s.runs, "warmup": s.warmup,
                     "seed": s.seed, "check_seqs": s.check_seqs, "page_sizes": page_sizes,
                     "tolerance": asdict(tolerance_for(s.dtype)), "l2_flush": True,
                     "cache_layout": s.cache_layout, "kv_dtypes": list(s.kv_dtypes),
                     "eager": {"calls": EAGER_CALLS, "min_calls": EAGER_MIN_CALLS, "batches": EAGER_BATCHES,
                               "warmup": s.warmup} if s.eager else None},
        "impls": {k: {"label": impl.label, "available": k not in reasons, "reason": reasons.get(k),
                      "returns_lse": impl.returns_lse, "fp8": impl.fp8} for k, impl in impls.items()},
        "rows": results,
    }
    return doc
