"""Configs for shapes the dispatch table has no entry for, derived from the entries of the nearest tuned shapes.

A GPU's table holds the shapes someone tuned (on the H200: 16-head decode and prefill at page sizes 1 and
64, 128-head decode); every other (kernel, bucket) used to run the one default config. :func:`derive` takes
instead the tuned entry of the nearest shape of the same variant in the same table and adapts its config
to the spec (:func:`adapt`). Nearest, in this order (:func:`neighbours`): the same head dims, the nearest
head count (by ratio; between equally near ones, the one on the same side of 64 heads, where decode's
warp-specialized kernel changes form), the nearest page size (by ratio), then the same bucket, else the
nearest bucket (batch or queries first, then KV length). An entry counts only while its kernel hash
matches its module (the caller's ``fresh``), like an exact entry.

Adapting keeps what the tuner chose where it carries over (the split policy, the merge tile, warps,
stages, the kernel kind) and redoes what depends on the heads or the page size by the rules the config
and the search space share (:mod:`tuner.runtime.config`): heads per program within the spec's bound,
the warp-specialized kernel only where the spec takes it (its heads per program, its 64-token tiles
below 64 heads, one program per multiprocessor), bulk copies only where a tile lies inside one page,
and the resource model (:func:`tuner.runtime.resources.fit_shared_memory` and ``infeasible``). A neighbour
whose config cannot be made legal is passed over for the next one; without any, the caller keeps the
default config. Pure and deterministic: the caller caches it per (spec, bucket, GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .buckets import DECODE_BUCKETS, PREFILL_BUCKETS, Bucket, buckets_for
from .config import (
    Config,
    DecodeConfig,
    PrefillConfig,
    default_decode_config,
    default_prefill_config,
    max_block_h,
    max_merge_block_h,
    tile_in_page,
    ws_block_h,
    ws_capable,
    ws_narrow,
    ws_tiles,
)
from .device import GPUInfo
from .loader import module_hash
from .resources import fit_shared_memory, infeasible
from .spec import MLASpec

if TYPE_CHECKING:  # dispatch imports this module
    from .dispatch import Entry, Table

STAGE1 = {"decode": ("block_h", "block_n", "programs_per_sm", "num_warps", "num_stages", "tma", "ws"),
          "prefill": ("block_m", "block_h", "block_n", "num_warps", "num_stages", "tma", "ws")}
"""The fields that make up the main kernel's kind and tiles: taken from the spec's default as a whole when
the neighbour's kernel kind cannot carry over."""


def _log_gap(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def spec_distance(spec: MLASpec, other: MLASpec) -> tuple[int, int, float, int, float]:
    """How far ``other``'s tuned configs are from fitting ``spec`` (smaller is nearer; same variant assumed):
    the cache's dtype first (an fp8 cache's kernels tile and split for half the bytes, a 16-bit one's are the
    last resort for it), then the head dims, heads and page size."""
    dims = int(other.head_dim_ckv != spec.head_dim_ckv) + int(other.head_dim_kpe != spec.head_dim_kpe)
    regime = int((other.num_heads < 64) != (spec.num_heads < 64))
    return (int(other.fp8 != spec.fp8), dims, _log_gap(spec.num_heads, other.num_heads), regime,
            _log_gap(spec.page_size, other.page_size))


def _bounds_key(bounds: tuple[int, int | None]) -> tuple[float, float]:
    return bounds[0], math.inf if bounds[1] is None else bounds[1]


def _coordinates(bucket: Bucket) -> tuple[int, int]:
    """(index of its batch or query range, index of its KV range) among its kind's buckets; a bucket over
    all KV lengths sits between the short and the long ones."""
    table = DECODE_BUCKETS if bucket.kind == "decode" else PREFILL_BUCKETS
    rows = sorted({b.rows for b in table}, key=_bounds_key)
    kvs = sorted({b.kv for b in table}, key=_bounds_key)
    return rows.index(bucket.rows), kvs.index(bucket.kv)


def bucket_distance(bucket: Bucket, other: Bucket) -> tuple[int, int]:
    (r1, k1), (r2, k2) = _coordinates(bucket), _coordinates(other)
    return abs(r1 - r2), abs(k1 - k2)


def neighbours(spec: MLASpec, bucket: Bucket, kernels: Mapping[str, Mapping[str, Entry]]
               ) -> list[tuple[MLASpec, Bucket, Entry]]:
    """The entries of ``kernels`` (kernel name -> bucket name -> entry) of ``spec``'s variant, nearest
    first, without ``spec``'s own entry for ``bucket``."""
    found = []
    for kernel, entries in kernels.items():
        other = MLASpec.from_name(kernel)
        if other.variant != spec.variant:
            continue
        by_name = {b.name: b for b in buckets_for(other)}
        for name, entry in entries.items():
            if other == spec and name == bucket.name:
                continue
            b = by_name[name]
            found.append(((spec_distance(spec, other), bucket_distance(bucket, b), kernel, name), other, b, entry))
    found.sort(key=lambda x: x[0])
    return [(other, b, entry) for _, other, b, entry in found]


def _default(spec: MLASpec, bucket: Bucket, gpu: GPUInfo) -> Config:
    """The spec's default config for the bucket's typical batch (what the derivation redoes fields from)."""
    if spec.is_decode:
        lengths = bucket.lengths
        return default_decode_config(spec, lengths.count, lengths.typical, gpu.num_sms, gpu.hopper)
    return default_prefill_config(spec, gpu.hopper)


def _tma(tma: int, block_n: int, source: MLASpec, spec: MLASpec) -> int:
    """Bulk copies at ``spec``: the neighbour's choice where it had one (its tile inside its page) and the
    tile lies inside ``spec``'s page; where it had none, the default's rule (whenever the tile fits)."""
    if tile_in_page(source, block_n):
        return int(bool(tma) and tile_in_page(spec, block_n))
    return int(tile_in_page(spec, block_n))


def adapt(config: Config, source: MLASpec, spec: MLASpec, bucket: Bucket, gpu: GPUInfo) -> Config | None:
    """``config``, tuned for ``source``, made legal for ``spec`` (see the module docstring); None when it
    cannot be (e.g. its shared memory cannot shrink to ``gpu``'s without breaking the kernel's rules)."""
    if source.is_decode != spec.is_decode:
        return None
    default = _default(spec, bucket, gpu)
    data = config.to_dict()
    ws_before = data["ws"]
    if ((data["ws"] and not ws_capable(spec)) or (not data["ws"] and not ws_capable(source) and default.ws)
            or source.fp8 != spec.fp8):
        # The neighbour's kernel kind cannot run here, or it had no choice and this spec has, or it read
        # another cache dtype (an fp8 tile's stages and conversion want their own tiles): the default's.
        data.update({k: getattr(default, k) for k in STAGE1["decode" if spec.is_decode else "prefill"]})
    elif data["ws"]:
        data["block_h"] = ws_block_h(spec)
        block_n = data["block_n"]
        if ws_narrow(source) != ws_narrow(spec) or tile_in_page(source, block_n) != tile_in_page(spec, block_n):
            data["block_n"], data["num_stages"] = ws_tiles(spec)  # other tiles: the default's for this spec
        if spec.is_decode:
            data["programs_per_sm"] = 1
        else:
            data["block_m"] = 64 // data["block_h"]
        data["tma"] = _tma(data["tma"], data["block_n"], source, spec)
    else:
        rows = data["block_h"] * data.get("block_m", 1)
        data["block_h"] = min(data["block_h"], max_block_h(spec))
        if not spec.is_decode:
            data["block_m"] = max(1, rows // data["block_h"])  # the tile keeps its rows
        data["tma"] = _tma(data["tma"], data["block_n"], source, spec)
    if spec.is_decode:
        data["merge_block_d"] = min(data["merge_block_d"], spec.head_dim_ckv)
        data["merge_block_h"] = min(data["merge_block_h"], max_merge_block_h(spec))
        if data["ws"] != ws_before:
            data["pdl"] = default.pdl  # the early or the late trigger: the default's rule for this kernel kind
    try:
        adapted = (DecodeConfig if spec.is_decode else PrefillConfig).from_dict(data)
    except ValueError:
        return None
    adapted = fit_shared_memory(spec, adapted, gpu.shared_bytes)
    for candidate in (adapted, replace(adapted, num_warps=8)):  # 8 warps spread a wider accumulator
        if infeasible(spec, candidate, gpu.shared_bytes) is None:
            return candidate
    return None


def derive(spec: MLASpec, bucket: Bucket, tables: Sequence[Table], gpu: GPUInfo,
           fresh: Callable[[MLASpec, Entry], bool]) -> tuple[Config, str] | None:
    """(config, where it came from) for ``spec`` on ``bucket`` from the nearest entry of the first of
    ``tables`` (this GPU's, then those of the same capability) that has one ``fresh`` accepts and
    :func:`adapt` can make legal; None without any."""
    for table in tables:
        for other, b, entry in neighbours(spec, bucket, table.kernels):
            if not fresh(other, entry):
                continue
            config = adapt(entry.config, other, spec, bucket, gpu)
            if config is None:
                continue
            where = "" if table.gpu.key == gpu.key else f" tuned on {table.gpu.key} (same capability)"
            return config, f"derived from {other.name()} (bucket {b.name}){where}"
    return None


def fresh(spec: MLASpec, entry: Entry) -> bool:
    """Whether ``entry`` was tuned for ``spec``'s generated module as it is now (its kernel hash)."""
    try:
        return entry.kernel_hash == module_hash(spec)
    except (OSError, ImportError):
        return False


def tune_command(spec: MLASpec) -> str:
    """The ``mla-tune tune`` command line that tunes ``spec`` (every bucket) on this GPU."""
    dims = "" if (spec.head_dim_ckv, spec.head_dim_kpe) == (512, 64) else \
        f" --ckv {spec.head_dim_ckv} --kpe {spec.head_dim_kpe}"
    kv = " --kv-dtype fp8" if spec.fp8 else ""
    return (f"mla-tune tune --heads {spec.num_heads} --page-size {spec.page_size}{dims} --variant {spec.variant}"
            f"{kv}")
