"""Serving-like FlashInfer-Bench workloads for a definition, in its trace-set layout.

A FlashInfer-Bench workload fixes the definition's variable axes and says where each input comes from:
``random`` (the harness draws normal values: the queries and the caches), ``scalar`` (``sm_scale``, the
definitions' upstream 1/sqrt(128 + 64)) or ``safetensors`` (a tensor in a file under ``blob/``: the index
arrays, which the harness would otherwise fill with random integers). Each workload here is a batch as a
server sees it: lognormal lengths (:func:`tuner.harness.inputs.skewed_lengths`), no empty sequence, a causal
prefill's queries the last tokens of their sequence (``q_len <= kv_len``: chunks after a cached prefix, or
fresh prompts), pages a random permutation of a cache with some free pages, partial last pages.

On disk (FlashInfer-Bench's own layout): ``workloads/mla_paged/<definition>.jsonl``, one workload trace a
line (``{"definition", "workload": {"axes", "inputs", "uuid"}, "solution": null, "evaluation": null}``), and
``blob/workloads/mla_paged/<definition>/<definition>_<uuid>.safetensors``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.harness.inputs import SM_SCALE, skewed_lengths
from tuner.runtime.spec import MLASpec

from .definitions import OP_TYPE, input_names

INDEX_INPUTS = ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len")
"""Inputs that come from the blob file (the rest of the tensors are random, sm_scale a scalar)."""


@dataclass(frozen=True)
class Shape:
    """A batch to draw: ``batch`` sequences of ``kv`` median KV tokens (decode) or of ``q`` median query
    tokens after ``prefix`` median cached tokens (prefill; ``prefix=0``: fresh prompts)."""

    batch: int
    kv: int = 0
    q: int = 0
    prefix: int = 0


DECODE_SHAPES = (Shape(16, kv=1024), Shape(64, kv=1536), Shape(160, kv=600), Shape(1, kv=4096),
                 Shape(32, kv=3072), Shape(256, kv=300))
PREFILL_SHAPES = (Shape(1, q=256), Shape(4, q=64, prefix=1024), Shape(12, q=24, prefix=600),
                  Shape(2, q=128, prefix=128), Shape(24, q=12, prefix=2048))
"""Workload i of a definition draws shape i (cycling): decode 1 to 256 requests, prefill 250 to 500 query tokens
(each at most twice its median: FlashInfer-Bench's reference loops over query rows in Python, and its time
bounds the run's)."""

SIGMA = 0.8
MAX_TOKENS = 16384


@dataclass(frozen=True)
class Batch:
    """One drawn batch: per sequence its query tokens (None for decode) and KV tokens."""

    kv_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None


def draw(spec: MLASpec, shape: Shape, seed: int) -> Batch:
    """Lognormal lengths for ``shape``: never an empty sequence, never a query row without a token to see."""
    if spec.is_decode:
        return Batch(skewed_lengths(shape.batch, shape.kv, 1, MAX_TOKENS, SIGMA, seed), None)
    q_lens = skewed_lengths(shape.batch, shape.q, 1, 2 * shape.q, SIGMA, seed)
    prefix = (skewed_lengths(shape.batch, shape.prefix, 1, MAX_TOKENS, SIGMA, seed + 1) if shape.prefix
              else (0,) * shape.batch)
    return Batch(tuple(q + p for q, p in zip(q_lens, prefix, strict=True)), q_lens)


def _indptr(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0).to(torch.int32)


def index_tensors(spec: MLASpec, batch: Batch, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The index inputs of ``batch`` (int32, those the definition takes) and the sizes of its variable axes.

    Pages are a random permutation of a cache one eighth larger than the batch needs (the free pages are
    never read); each sequence's last page holds ``(kv_len - 1) % page_size + 1`` tokens.
    """
    ps = spec.page_size
    pages = [-(-n // ps) for n in batch.kv_lens]
    used = sum(pages)
    num_pages = used + used // 8 + 1
    g = torch.Generator().manual_seed(seed)
    found = {
        "kv_indptr": _indptr(pages),
        "kv_indices": torch.randperm(num_pages, generator=g)[:used].to(torch.int32),
        "kv_last_page_len": torch.tensor([(n - 1) % ps + 1 for n in batch.kv_lens], dtype=torch.int32),
    }
    if batch.q_lens is not None:
        found["qo_indptr"] = _indptr(list(batch.q_lens))
    rows = len(batch.kv_lens) if batch.q_lens is None else sum(batch.q_lens)
    sizes = {"batch_size": len(batch.kv_lens), "total_q": rows, "num_pages": num_pages,
             "len_indptr": len(batch.kv_lens) + 1, "num_kv_indices": used}
    return {k: v for k, v in found.items() if k in input_names(spec)}, sizes


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError(f"the workloads' blob files need the safetensors package ({err}): pip install "
                          "safetensors") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def workload_uuid(name: str, index: int, seed: int) -> str:
    """Stable across exports of the same definition, index and seed."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mla-tuner/{name}/{index}/{seed}").hex


def write_workloads(root: Path, spec: MLASpec, definition: dict[str, Any], count: int, seed: int = 0,
                    shapes: tuple[Shape, ...] | None = None) -> list[dict[str, Any]]:
    """Write ``count`` workloads of ``spec`` (its ``definition`` as JSON data) under ``root``: the JSONL file
    and one blob file each. Returns the workload traces written."""
    shapes = shapes or (DECODE_SHAPES if spec.is_decode else PREFILL_SHAPES)
    name = spec.name()
    variable = [axis for axis, a in definition["axes"].items() if a["type"] == "var"]
    traces = []
    for i in range(count):
        draw_seed = seed * 1000 + i
        tensors, sizes = index_tensors(spec, draw(spec, shapes[i % len(shapes)], draw_seed), draw_seed)
        key = workload_uuid(name, i, seed)
        blob = Path("blob", "workloads", OP_TYPE, name, f"{name}_{key}.safetensors")
        _save(tensors, root / blob)
        inputs: dict[str, dict[str, Any]] = {}
        for item in definition["inputs"]:
            if item in tensors:
                inputs[item] = {"type": "safetensors", "path": blob.as_posix(), "tensor_key": item}
            elif item == "sm_scale":
                inputs[item] = {"type": "scalar", "value": SM_SCALE}
            else:
                inputs[item] = {"type": "random"}
        workload = {"axes": {axis: sizes[axis] for axis in variable}, "inputs": inputs, "uuid": key}
        traces.append({"definition": name, "workload": workload, "solution": None, "evaluation": None})
    path = root / "workloads" / OP_TYPE / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return traces
