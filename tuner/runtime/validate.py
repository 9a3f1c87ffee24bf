"""Input validation for the runtime API (``docs/contract.md``, "Bad input").

Metadata checks (dtype, rank, shape, device, strides) are cheap and run on every call. Checks that
need the index data on the host run only where a host copy exists or is asked for: ``plan()``, the
tests, the tuner, ``validate_data=True`` or the environment switch ``MLA_TUNER_VALIDATE=1``
(:func:`data_validation`); never silently in the launch path.

Element types: with a 16-bit cache the caches define the dtype and both queries must have it. bf16 and
fp16 are the supported dtypes. float32 is a test dtype (the reference precision the CPU tests compare at):
it is accepted only where the Triton interpreter runs the kernels (tensors not on a CUDA device, or
``TRITON_INTERPRET`` set) and refused on a GPU with a TypeError naming the tensor. An fp8 cache (both
caches float8_e4m3fn) comes with per-tensor scales (:func:`check_scales`); its queries are 16-bit (or
float32 under the interpreter), both of one dtype, which is the output's.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import paths
from .device import interpreting
from .spec import MLASpec

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
"""The element types of the queries and caches on a GPU."""
TEST_DTYPE = torch.float32
"""Accepted besides :data:`SUPPORTED_DTYPES` only under the Triton interpreter (:func:`float32_allowed`)."""
INPUT_DTYPES = (*SUPPORTED_DTYPES, TEST_DTYPE)
FP8_DTYPE = torch.float8_e4m3fn
"""The fp8 cache dtype (per-tensor scales ``ckv_scale`` / ``kpe_scale``)."""
FP8_MIN_CAPABILITY = (8, 9)
"""GPUs that convert float8_e4m3fn in hardware (Ada, Hopper and newer)."""
INDEX_DTYPE = torch.int32
_OFF = ("", "0")


def data_validation(validate_data: bool) -> bool:
    """Whether to check the index data on the host: ``validate_data``, or forced on for every call by
    the environment variable ``MLA_TUNER_VALIDATE`` (any value but empty or ``0``; read on each call)."""
    return bool(validate_data) or os.environ.get(paths.ENV_VALIDATE, "").strip() not in _OFF


def float32_allowed(device: torch.device) -> bool:
    """float32 inputs run only under the Triton interpreter: tensors off CUDA, or ``TRITON_INTERPRET``."""
    return device.type != "cuda" or interpreting()


def _need_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(x).__name__}")
    return x


def check_tensor(name: str, x: object, shape: Sequence[int | None], dtypes: Sequence[torch.dtype] | None,
                 device: torch.device | None = None, last_contiguous: bool = True) -> torch.Tensor:
    """Check rank, shape (None = any), dtype (None = any), device and a contiguous last dimension."""
    t = _need_tensor(name, x)
    if t.dim() != len(shape):
        raise ValueError(f"{name}: expected {len(shape)} dimensions, found {t.dim()} (shape {tuple(t.shape)})")
    for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
        if want is not None and want != got:
            dims = ", ".join("*" if s is None else str(s) for s in shape)
            expect = f"({dims},)" if len(shape) == 1 else f"({dims})"
            raise ValueError(f"{name}: expected shape {expect}, found {tuple(t.shape)} (axis {axis})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, found {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, found {t.device}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), found strides {t.stride()}")
    if t.dim() > 0 and any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported, found {t.stride()}")
    return t


def _check_fp8_capable(name: str, device: torch.device) -> None:
    """TypeError naming ``name`` unless ``device`` converts float8_e4m3fn (any device under the interpreter; a
    CUDA GPU of compute capability 8.9 or newer)."""
    if device.type != "cuda" or interpreting():
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise TypeError(f"{name}: {FP8_DTYPE} needs a GPU of compute capability 8.9 or newer, found {device} of "
                        f"capability {'.'.join(map(str, capability))}")


def check_dtypes(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                 kpe_cache: torch.Tensor) -> torch.dtype:
    """The queries' element type, which is the output's (TypeError naming the tensor that differs).

    Each must be bf16 or fp16 (float32 too under the interpreter, :func:`float32_allowed`), or for both
    caches float8_e4m3fn (a GPU of compute capability 8.9 or newer). The caches define the dtype: kpe_cache
    must match ckv_cache, then each query must match the caches (with an fp8 cache: q_pe must match q_nope),
    so a mixed pair of queries names the one that differs.
    """
    supported = " or ".join(map(str, SUPPORTED_DTYPES))
    fp8 = ckv_cache.dtype == FP8_DTYPE
    if fp8 and kpe_cache.dtype == FP8_DTYPE:
        _check_fp8_capable("ckv_cache", ckv_cache.device)
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
        if fp8 and name.endswith("cache"):
            if t.dtype != FP8_DTYPE:
                raise TypeError(f"{name}: expected dtype {FP8_DTYPE} (that of ckv_cache: the two caches share "
                                f"one dtype), found {t.dtype}")
            continue
        if t.dtype == FP8_DTYPE and not name.endswith("cache"):
            raise TypeError(f"{name}: expected dtype {supported} (the queries stay 16-bit with an fp8 "
                            f"({FP8_DTYPE}) cache), found {t.dtype}")
        if t.dtype == TEST_DTYPE and not float32_allowed(t.device):
            raise TypeError(f"{name}: expected dtype {supported} on a GPU ({TEST_DTYPE} is a test dtype, accepted "
                            f"only under the Triton interpreter), found {t.dtype} on {t.device}")
        if t.dtype not in INPUT_DTYPES:
            also = f", or {FP8_DTYPE} for both caches" if name.endswith("cache") else ""
            raise TypeError(f"{name}: expected dtype {supported} (or {TEST_DTYPE} under the Triton interpreter"
                            f"{also}), found {t.dtype}")
    if fp8:
        if q_pe.dtype != q_nope.dtype:
            raise TypeError(f"q_pe: expected dtype {q_nope.dtype} (that of q_nope), found {q_pe.dtype}")
        return q_nope.dtype
    dtype = ckv_cache.dtype
    if kpe_cache.dtype != dtype:
        raise TypeError(f"kpe_cache: expected dtype {dtype} (that of ckv_cache), found {kpe_cache.dtype}")
    for name, q in (("q_nope", q_nope), ("q_pe", q_pe)):
        if q.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (that of ckv_cache and kpe_cache), found {q.dtype}")
    return dtype


def check_sm_scale(sm_scale: object) -> float:
    if isinstance(sm_scale, torch.Tensor):
        raise TypeError("sm_scale: expected a Python float (a tensor would need a device sync), "
                        f"found a tensor of shape {tuple(sm_scale.shape)}")
    if not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
        raise TypeError(f"sm_scale: expected a float, found {type(sm_scale).__name__}")
    value = float(sm_scale)
    if not math.isfinite(value):
        raise ValueError(f"sm_scale: expected a finite float, found {value}")
    return value


def spec_from_tensors(variant: str, q_nope: object, q_pe: object, ckv_cache: object,
                      kpe_cache: object) -> MLASpec:
    """Derive the specialization from the input shapes, checking ranks and dtypes first."""
    q_nope_t = check_tensor("q_nope", q_nope, (None, None, None), None)
    q_pe_t = check_tensor("q_pe", q_pe, (None, None, None), None)
    ckv_t = check_tensor("ckv_cache", ckv_cache, (None, None, None), None)
    kpe_t = check_tensor("kpe_cache", kpe_cache, (None, None, None), None)
    check_dtypes(q_nope_t, q_pe_t, ckv_t, kpe_t)
    try:
        return MLASpec(variant, q_nope_t.shape[1], q_nope_t.shape[2], q_pe_t.shape[2], ckv_t.shape[1],  # type: ignore[arg-type]
                       ckv_t.dtype == FP8_DTYPE)
    except ValueError as err:
        raise ValueError(f"unsupported shape (q_nope {tuple(q_nope_t.shape)}, q_pe {tuple(q_pe_t.shape)}, "
                         f"ckv_cache {tuple(ckv_t.shape)}): {err}") from None


def check_inputs(spec: MLASpec, rows: int, q_nope: object, q_pe: object, ckv_cache: object,
                 kpe_cache: object) -> None:
    """q_nope/q_pe [rows, H, *] and the two caches against ``spec``: the dtypes (:func:`check_dtypes`; an
    fp8 cache exactly where ``spec`` is an fp8 one), one device (q_nope's)."""
    tensors = [_need_tensor(name, t) for name, t in
               (("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache))]
    dtype = check_dtypes(*tensors)
    q_nope_t, q_pe_t, ckv_t, kpe_t = tensors
    if (ckv_t.dtype == FP8_DTYPE) != spec.fp8:
        want = f"{FP8_DTYPE}" if spec.fp8 else "a 16-bit dtype, that of the queries"
        raise TypeError(f"ckv_cache: expected {want} (the planned kernel {spec.name()}; plan(kv_dtype=...) sets "
                        f"it), found {ckv_t.dtype}")
    kv_dtype = ckv_t.dtype
    device = q_nope_t.device
    h, c, k, ps = spec.num_heads, spec.head_dim_ckv, spec.head_dim_kpe, spec.page_size
    check_tensor("q_nope", q_nope_t, (rows, h, c), (dtype,), device)
    check_tensor("q_pe", q_pe_t, (rows, h, k), (dtype,), device)
    check_tensor("ckv_cache", ckv_t, (None, ps, c), (kv_dtype,), device)
    check_tensor("kpe_cache", kpe_t, (ckv_t.shape[0], ps, k), (kv_dtype,), device)


Scale = float | torch.Tensor
"""A per-tensor scale of an fp8 cache: a Python float, or a one-element float32 tensor on the cache's device."""


def check_scales(fp8: bool, ckv_scale: object, kpe_scale: object, device: torch.device) -> None:
    """The scales of the caches: both given with an fp8 cache (``fp8``), each a finite positive float or a
    one-element float32 tensor on ``device`` (its value is read on the device: not checked); neither with
    a 16-bit cache. ValueError / TypeError naming the scale."""
    for name, scale in (("ckv_scale", ckv_scale), ("kpe_scale", kpe_scale)):
        if not fp8:
            if scale is not None:
                raise ValueError(f"{name}: given with a 16-bit cache (scales belong to a {FP8_DTYPE} cache, "
                                 f"whose value is fp8 * scale); found {_describe(scale)}")
            continue
        if scale is None:
            raise ValueError(f"{name}: required with a {FP8_DTYPE} cache (a cached value is fp8 * scale): a "
                             "positive float or a one-element float32 tensor on the cache's device")
        if isinstance(scale, torch.Tensor):
            if scale.dtype != torch.float32 or scale.numel() != 1:
                raise TypeError(f"{name}: expected a one-element float32 tensor, found dtype {scale.dtype} and "
                                f"shape {tuple(scale.shape)}")
            if scale.device != device:
                raise ValueError(f"{name}: expected device {device} (the cache's), found {scale.device}")
            continue
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise TypeError(f"{name}: expected a float or a one-element float32 tensor, found "
                            f"{type(scale).__name__}")
        value = float(scale)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite positive float, found {value}")


def _describe(scale: object) -> str:
    if isinstance(scale, torch.Tensor):
        return f"a tensor of shape {tuple(scale.shape)}"
    return repr(scale)


def check_kv_dtype(kv_dtype: object, device: torch.device) -> bool:
    """``plan(kv_dtype=)``: whether the planned cache is fp8 (None or a 16-bit dtype: the queries' dtype)."""
    if kv_dtype is None or kv_dtype in INPUT_DTYPES:
        return False
    if kv_dtype != FP8_DTYPE:
        raise TypeError(f"kv_dtype: expected None (a 16-bit cache of the queries' dtype), "
                        f"{' or '.join(map(str, SUPPORTED_DTYPES))} or {FP8_DTYPE}, found {kv_dtype!r}")
    _check_fp8_capable("kv_dtype", device)
    return True


def check_indices(batch: int, kv_indptr: object, kv_indices: object, kv_last_page_len: object,
                  device: torch.device, qo_indptr: object = None) -> None:
    check_tensor("kv_indptr", kv_indptr, (batch + 1,), (INDEX_DTYPE,), device)
    check_tensor("kv_indices", kv_indices, (None,), (INDEX_DTYPE,), device)
    if kv_last_page_len is not None:
        check_tensor("kv_last_page_len", kv_last_page_len, (batch,), (INDEX_DTYPE,), device)
    if qo_indptr is not None:
        check_tensor("qo_indptr", qo_indptr, (batch + 1,), (INDEX_DTYPE,), device)


def check_outputs(rows: int | tuple[int, ...], spec: MLASpec, dtype: torch.dtype, device: torch.device,
                  out: object, lse: object) -> None:
    """out [*rows, H, ckv] in ``dtype`` and lse [*rows, H] float32 (``rows``: an int, or the leading
    dimensions, e.g. (B, s_q) for queries [B, s_q, H, *])."""
    lead = tuple(rows) if isinstance(rows, tuple) else (rows,)  # an int or a SymInt (tracing), or a tuple
    if out is not None:
        check_tensor("out", out, (*lead, spec.num_heads, spec.head_dim_ckv), (dtype,), device)
    if lse is not None:
        check_tensor("lse", lse, (*lead, spec.num_heads), (torch.float32,), device)


def check_total_q(qo_last: int, rows: int) -> None:
    """``qo_indptr[-1]`` must equal the query rows: fewer leaves rows unwritten (garbage or NaN in the
    output), more makes the kernel read q_nope and write out past their ends."""
    if qo_last != rows:
        raise ValueError(f"qo_indptr: expected the last value to equal the rows of q_nope ({rows}), "
                         f"found {qo_last}")


def check_total_q_if_on_host(qo_indptr: torch.Tensor, rows: int) -> None:
    """:func:`check_total_q` where it costs no device sync: ``qo_indptr`` in host memory (always so
    under the interpreter on CPU tensors). On a GPU the one-call form checks it only under validation."""
    if qo_indptr.device.type == "cpu":
        check_total_q(int(qo_indptr[-1]), rows)


def check_planned_pages(max_page_id: int | None, ckv_cache: torch.Tensor) -> None:
    """At ``run()``: the largest page id seen at ``plan()`` against the cache given now (its
    ``shape[0]``, tensor metadata: no sync). ``max_page_id`` None: plan did not look at the page ids."""
    num_pages = ckv_cache.shape[0]
    if max_page_id is not None and max_page_id >= num_pages:
        raise ValueError(f"kv_indices: expected page ids in [0, {num_pages}), found {max_page_id} (the largest "
                         f"page id at plan(); ckv_cache and kpe_cache have {num_pages} pages)")


@dataclass(frozen=True)
class HostIndexData:
    """What :func:`check_host_data` learnt from its host copy of the index data.

    kv_lens: int64 [B] tokens per sequence, on the host; max_page_id: the largest page id any sequence
    uses (-1 without pages), for ``run()`` to compare with the cache it gets; total_q: ``qo_indptr[-1]``
    (None without qo_indptr).
    """

    kv_lens: torch.Tensor
    max_page_id: int
    total_q: int | None


def _to_host(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """int64 host copies of the given int32 1-D tensors, in one device-to-host transfer."""
    present = [t for t in tensors if t is not None]
    if not present or all(t.device.type == "cpu" for t in present):
        return [None if t is None else t.long() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in present]).cpu().long()
    parts = iter(flat.split([t.numel() for t in present]))
    return [None if t is None else next(parts) for t in tensors]


def check_host_data(spec: MLASpec, num_pages: int | None, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor | None, qo_indptr: torch.Tensor | None = None,
                    total_q: int | None = None, s_q: int = 1) -> HostIndexData:
    """The checks that need the index data on the host (copies it: one device sync).

    kv_indptr and qo_indptr start at 0 and never decrease, kv_indptr[-1] <= len(kv_indices), page ids
    >= 0 and, where ``num_pages`` is known, < num_pages; kv_last_page_len in [1, page_size] for
    sequences with pages; with qo_indptr, kv_len >= q_len and, where ``total_q`` (the rows of q_nope)
    is known, qo_indptr[-1] == total_q; with ``s_q`` > 1 (decode of s_q queries per request, whose
    queries are its last s_q tokens), kv_len >= s_q for every request. Returns what ``plan()`` keeps
    (:class:`HostIndexData`).
    """
    indptr, ids_all, last, qo = _to_host([kv_indptr, kv_indices, kv_last_page_len, qo_indptr])
    assert indptr is not None and ids_all is not None
    _check_indptr("kv_indptr", indptr, ids_all.numel())
    ids = ids_all[: int(indptr[-1])]
    max_page_id = -1
    if ids.numel():
        max_page_id = int(ids.max())
        bad = (ids < 0) if num_pages is None else (ids < 0) | (ids >= num_pages)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0])
            expect = ">= 0" if num_pages is None else f"in [0, {num_pages})"
            raise ValueError(f"kv_indices: expected page ids {expect}, found {int(ids[pos])} at position {pos}")
    n_pages = indptr[1:] - indptr[:-1]
    if last is not None:
        bad = (n_pages > 0) & ((last < 1) | (last > spec.page_size))
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"kv_last_page_len: expected values in [1, {spec.page_size}] for sequences with "
                             f"pages, found {int(last[b])} at sequence {b}")
    kv_len = kv_lengths(indptr, spec.page_size, last)
    if s_q > 1:
        bad = kv_len < s_q
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"kv_indptr: expected kv_len >= s_q = {s_q} for every sequence (its {s_q} queries are "
                             f"its last {s_q} tokens), found kv_len {int(kv_len[b])} at sequence {b} (kv_len from "
                             "kv_indptr and kv_last_page_len)")
    qo_last = None
    if qo is not None:
        _check_indptr("qo_indptr", qo, None)
        qo_last = int(qo[-1])
        if total_q is not None:
            check_total_q(qo_last, total_q)
        q_len = qo[1:] - qo[:-1]
        bad = q_len > kv_len
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"qo_indptr: sequence {b} has q_len {int(q_len[b])} > kv_len {int(kv_len[b])} "
                             "(its queries are its last q_len tokens, so kv_len >= q_len is required)")
    return HostIndexData(kv_lens=kv_len, max_page_id=max_page_id, total_q=qo_last)


def layout_kv_lengths(host: HostIndexData | None, kv_indptr: torch.Tensor, page_size: int,
                      kv_last_page_len: torch.Tensor | None) -> torch.Tensor:
    """int64 [B] tokens per sequence on the host, for ``plan()``'s config: what :func:`check_host_data`
    learnt, else from a host copy of the index data (one transfer: a device sync)."""
    if host is not None:
        return host.kv_lens
    indptr, last = _to_host([kv_indptr, kv_last_page_len])
    assert indptr is not None
    return kv_lengths(indptr, page_size, last)


def kv_lengths(kv_indptr: torch.Tensor, page_size: int,
               kv_last_page_len: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B]: tokens of each sequence, ``(pages - 1) * page_size + kv_last_page_len`` (0 without
    pages; full pages when ``kv_last_page_len`` is None or the page size is 1). On the tensors' device."""
    n_pages = (kv_indptr[1:] - kv_indptr[:-1]).long()
    if page_size == 1 or kv_last_page_len is None:
        last = torch.full_like(n_pages, page_size)
    else:
        last = kv_last_page_len.long()
    return torch.where(n_pages > 0, (n_pages - 1) * page_size + last, torch.zeros_like(n_pages))


def _check_indptr(name: str, indptr: torch.Tensor, limit: int | None) -> None:
    if int(indptr[0]) != 0:
        raise ValueError(f"{name}: expected to start at 0, found {int(indptr[0])}")
    steps = indptr[1:] - indptr[:-1]
    if bool((steps < 0).any()):
        b = int((steps < 0).nonzero()[0])
        raise ValueError(f"{name}: expected non-decreasing values, found {int(indptr[b])} then "
                         f"{int(indptr[b + 1])} at position {b}")
    if limit is not None and int(indptr[-1]) > limit:
        raise ValueError(f"{name}: last value {int(indptr[-1])} exceeds the length of kv_indices ({limit})")
