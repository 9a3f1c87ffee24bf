"""FlashInfer-Bench solutions: mla-tuner's tuned dispatch behind each definition's entry point.

A solution is one ``main.py`` whose ``run`` takes the definition's inputs in the definition's order, then its
outputs, and calls :func:`tuner.mla_decode` / :func:`tuner.mla_prefill`; the config comes from mla-tuner's
dispatch table of the GPU it runs on (:mod:`tuner.runtime.dispatch`), as in any other call. Its
description records the mla-tuner version, the GPU the table was tuned on and a hash of the table file.

:func:`flashinfer_solution` writes the comparison FlashInfer-Bench's package does not ship: FlashInfer's
``BatchMLAPagedAttentionWrapper`` behind the same interface (the source only names flashinfer; nothing here
imports it).
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.runtime import __version__, dispatch, paths
from tuner.runtime.buckets import buckets_for
from tuner.runtime.decode import mla_decode
from tuner.runtime.device import GPUInfo, gpu_info
from tuner.runtime.loader import module_hash
from tuner.runtime.prefill import mla_prefill
from tuner.runtime.spec import MLASpec

from .definitions import OUTPUTS, input_names

AUTHOR = "mla-tuner"
ENTRY_POINT = "main.py::run"


@dataclass(frozen=True)
class TableInfo:
    """The dispatch table a solution's description names: its file, GPU and content hash, and per kernel
    the number of buckets whose entry matches the current generated module (what the runtime uses)."""

    path: Path
    gpu: GPUInfo
    sha256: str
    tuned: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{_shown(self.path)}: {self.gpu.describe()}, sha256 {self.sha256[:16]}"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder where it lies below it (shorter in reports)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def choose_table(gpu_key: str | None) -> TableInfo:
    """The table of ``gpu_key``; by default the current GPU's, else the only table there is.

    Raises ValueError naming the dispatch folder and its tables when the choice is not clear.
    """
    folder = paths.dispatch_dir()
    available = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if gpu_key is None:
        current = gpu_info().key
        if current in available:
            gpu_key = current
        elif len(available) == 1:
            gpu_key = available[0]
        else:
            raise ValueError(f"--gpu: no table for this machine ({current}) in {folder}; choose one of "
                             f"{', '.join(available) or '(none)'}")
    path = dispatch.table_path(gpu_key)
    if not path.is_file():
        raise ValueError(f"--gpu: no dispatch table {path} (tables: {', '.join(available) or 'none'})")
    table = dispatch.load_table(path)
    tuned = {}
    for kernel, entries in table.kernels.items():
        current_hash = module_hash(MLASpec.from_name(kernel))
        tuned[kernel] = sum(e.kernel_hash == current_hash for e in entries.values())
    return TableInfo(path, table.gpu, hashlib.sha256(path.read_bytes()).hexdigest(), tuned)


def _api(spec: MLASpec) -> Callable[..., Any]:
    return mla_decode if spec.is_decode else mla_prefill


def _wrapped(head: str, items: list[str], indent: int) -> str:
    """``head(item, item, ...)`` on lines of at most 112 characters, continued under the first item."""
    text = head + "(" + ", ".join(items) + ")"
    return textwrap.fill(text, width=112, initial_indent=" " * indent, subsequent_indent=" " * (indent + len(head) + 1),
                         break_long_words=False, break_on_hyphens=False)


def _signature(spec: MLASpec) -> str:
    """``def run(...):`` with the definition's inputs in order, then its outputs."""
    return _wrapped("def run", list(input_names(spec) + OUTPUTS), 0) + ":"


def _call(spec: MLASpec) -> str:
    """The API call of ``run``: the definition's inputs in the API's positional order (which differs: the API
    takes sm_scale before the optional kv_last_page_len, the definitions after it), by keyword from the first
    the definition lacks on; then the variant's mask and the outputs."""
    given = set(input_names(spec))
    args: list[str] = []
    by_keyword = False
    for name, param in inspect.signature(_api(spec)).parameters.items():
        if param.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        if name not in given:
            by_keyword = True
            continue
        value = "float(sm_scale)" if name == "sm_scale" else name
        args.append(f"{name}={value}" if by_keyword else value)
        given.discard(name)
    if given:
        raise ValueError(f"{spec.name()}: tuner.{_api(spec).__name__} takes no {sorted(given)}")
    if not spec.is_decode:
        args.append(f"causal={spec.causal}")
    return _wrapped(f"tuner.{_api(spec).__name__}", args + ["out=output", "lse=lse"], 4)


_MAIN_PY = '''"""{name}: mla-tuner {version}'s FlashInfer-Bench entry point (by `mla-tune export-fib`).

run() takes the definition's inputs in the definition's order, then its outputs, and calls tuner.{api}, which
takes its launch config from mla-tuner's tuned dispatch table of the GPU it runs on.
"""

import warnings

import tuner

EXPORTED_BY = "{version}"
if tuner.__version__ != EXPORTED_BY:
    warnings.warn(f"exported by mla-tuner {{EXPORTED_BY}}, running mla-tuner {{tuner.__version__}}", stacklevel=1)

# Destination-passing style (the solution's spec.destination_passing_style is true): the harness allocates
# `output` and `lse` outside the timed region and passes them after the inputs, and tuner writes into them
# (out=, lse=), as a serving engine calls it; returning fresh tensors would time two allocations per call.
# lse: the definition's is base 2 (its reference divides the natural log-sum-exp by ln 2), and so is tuner's:
# no conversion. output: the query dtype (the definition's bfloat16).


{signature}
{note}{call}
'''


def main_source(spec: MLASpec) -> str:
    """``main.py`` of the solution for ``spec``."""
    names = input_names(spec)
    note = ""
    if "kv_last_page_len" in names:
        note = ("    # tuner takes sm_scale before kv_last_page_len; the definition has them the other way round.\n")
    return _MAIN_PY.format(name=spec.name(), version=__version__, api=_api(spec).__name__,
                           signature=_signature(spec), note=note, call=_call(spec))


def solution_name(spec: MLASpec) -> str:
    return f"{AUTHOR}_{spec.name()}"


def _solution(name: str, spec: MLASpec, language: str, description: str, source: str,
              dependencies: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "definition": spec.name(),
        "author": AUTHOR,
        "description": description,
        "spec": {"language": language, "target_hardware": ["cuda"], "entry_point": ENTRY_POINT,
                 "dependencies": dependencies, "destination_passing_style": True},
        "sources": [{"path": ENTRY_POINT.split("::")[0], "content": source}],
    }


def solution(spec: MLASpec, table: TableInfo) -> dict[str, Any]:
    """The FlashInfer-Bench ``Solution`` of ``spec`` as JSON data."""
    tuned, buckets = table.tuned.get(spec.name(), 0), len(buckets_for(spec))
    tuned = f"{tuned} of this kernel's {buckets} shape buckets tuned there" if tuned else (
        "none of this kernel's shape buckets tuned there (it runs the runtime's untuned configs)")
    description = (f"mla-tuner {__version__}: generated Triton kernels for MLA over a paged KV cache, through "
                   f"tuner.{_api(spec).__name__} and its tuned dispatch. Dispatch table {table.describe()}; {tuned}. "
                   "On another GPU the runtime reads that GPU's table, else one of the same compute capability.")
    return _solution(solution_name(spec), spec, "triton", description, main_source(spec),
                     [f"mla-tuner=={__version__}"])


_FLASHINFER_PY = '''"""{name}: FlashInfer's BatchMLAPagedAttentionWrapper.

Backend "auto" (fa3 on Hopper) behind the definition's interface: the comparison that mla-tuner's
`mla-tune export-fib --with-flashinfer` writes (FlashInfer-Bench's package ships no FlashInfer solution).

The harness gives a solution nothing to plan ahead with, so plan() (which copies the index arrays to the
host) runs inside every call, and the harness times it.
"""

import inspect

import torch
from flashinfer.mla import BatchMLAPagedAttentionWrapper

PAGE_SIZE = {page_size}
_WRAPPERS = {{}}


def _wrapper(device):
    if device not in _WRAPPERS:
        workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
        _WRAPPERS[device] = BatchMLAPagedAttentionWrapper(workspace, backend="auto")
    return _WRAPPERS[device]


{signature}
    device = q_nope.device
{query_rows}    pages = kv_indptr[1:] - kv_indptr[:-1]
    kv_len = {kv_len}
    wrapper = _wrapper(device)
    shape = dict(num_heads=q_nope.shape[1], head_dim_ckv=q_nope.shape[2], head_dim_kpe=q_pe.shape[2],
                 page_size=PAGE_SIZE, causal={causal}, sm_scale=float(sm_scale), q_data_type=q_nope.dtype,
                 kv_data_type=ckv_cache.dtype)
    try:
        from flashinfer.mla import MLAPlanMetadata
    except ImportError:  # releases before the metadata object take the flat CSR arguments
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_len, *shape.values())
    else:
        wrapper.plan(metadata=MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len),
                     query_layout="split", kv_cache_layout="split", lse_mode="base2", **shape)
    if "query" in inspect.signature(wrapper.run).parameters:
        wrapper.run(query=(q_nope, q_pe), kv_cache=(ckv_cache, kpe_cache), out=output, lse=lse, return_lse=True)
    else:
        wrapper.run(q_nope, q_pe, ckv_cache, kpe_cache, out=output, lse=lse, return_lse=True)
'''


def flashinfer_solution(spec: MLASpec) -> dict[str, Any]:
    """A FlashInfer solution of ``spec`` (language python, destination-passing), for the speedup column of
    ``perf/fib_run.sh``: FlashInfer-Bench 0.1.2's package ships none, and its dataset's baselines are not
    at hand offline."""
    query_rows = "" if not spec.is_decode else (
        "    qo_indptr = torch.arange(q_nope.shape[0] + 1, dtype=torch.int32, device=device)\n")
    kv_len = ("torch.where(pages > 0, (pages - 1) * PAGE_SIZE + kv_last_page_len, 0).to(torch.int32)"
              if "kv_last_page_len" in input_names(spec) else "(pages * PAGE_SIZE).to(torch.int32)")
    source = _FLASHINFER_PY.format(name=spec.name(), page_size=spec.page_size, causal=spec.causal,
                                   signature=_signature(spec), query_rows=query_rows,
                                   kv_len=kv_len)
    description = ("FlashInfer's BatchMLAPagedAttentionWrapper (backend auto), planned inside each call; written "
                   f"by mla-tuner {__version__} as the comparison for its own solution, not FlashInfer-Bench's "
                   "baseline.")
    return _solution(f"flashinfer_{spec.name()}", spec, "python", description, source, ["flashinfer-python"])
