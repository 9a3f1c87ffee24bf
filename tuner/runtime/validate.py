"""Input validation for the runtime API (``shared/mla_paged.md``, "Bad input").

Metadata checks (dtype, rank, shape, device, strides) are cheap and run on every call. Checks that
need the index data on the host run only where a host copy exists or is asked for: ``plan()``, the
tests, the tuner, or ``validate=True``; never silently in the launch path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .spec import MLASpec

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPE = torch.int32


def _need_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(x).__name__}")
    return x


def check_tensor(name: str, x: object, shape: Sequence[int | None], dtypes: Sequence[torch.dtype],
                 device: torch.device | None = None, last_contiguous: bool = True) -> torch.Tensor:
    """Check rank, shape (None = any), dtype, device and a contiguous last dimension."""
    t = _need_tensor(name, x)
    if t.dim() != len(shape):
        raise ValueError(f"{name}: expected {len(shape)} dimensions, found {t.dim()} (shape {tuple(t.shape)})")
    for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
        if want is not None and want != got:
            dims = ", ".join("*" if s is None else str(s) for s in shape)
            expect = f"({dims},)" if len(shape) == 1 else f"({dims})"
            raise ValueError(f"{name}: expected shape {expect}, found {tuple(t.shape)} (axis {axis})")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, found {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, found {t.device}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), found strides {t.stride()}")
    if t.dim() > 0 and any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported, found {t.stride()}")
    return t


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
    """Derive the specialization from the input shapes, checking ranks first."""
    q_nope_t = check_tensor("q_nope", q_nope, (None, None, None), INPUT_DTYPES)
    q_pe_t = check_tensor("q_pe", q_pe, (None, None, None), INPUT_DTYPES)
    ckv_t = check_tensor("ckv_cache", ckv_cache, (None, None, None), INPUT_DTYPES)
    check_tensor("kpe_cache", kpe_cache, (None, None, None), INPUT_DTYPES)
    try:
        return MLASpec(variant, q_nope_t.shape[1], q_nope_t.shape[2], q_pe_t.shape[2], ckv_t.shape[1])  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"unsupported shape (q_nope {tuple(q_nope_t.shape)}, q_pe {tuple(q_pe_t.shape)}, "
                         f"ckv_cache {tuple(ckv_t.shape)}): {err}") from None


def check_inputs(spec: MLASpec, rows: int, q_nope: torch.Tensor, q_pe: torch.Tensor,
                 ckv_cache: torch.Tensor, kpe_cache: torch.Tensor) -> None:
    """q_nope/q_pe [rows, H, *] and the two caches against ``spec``: one dtype, one device."""
    dtype, device = q_nope.dtype, q_nope.device
    h, c, k, ps = spec.num_heads, spec.head_dim_ckv, spec.head_dim_kpe, spec.page_size
    check_tensor("q_nope", q_nope, (rows, h, c), INPUT_DTYPES, device)
    check_tensor("q_pe", q_pe, (rows, h, k), (dtype,), device)
    check_tensor("ckv_cache", ckv_cache, (None, ps, c), (dtype,), device)
    check_tensor("kpe_cache", kpe_cache, (ckv_cache.shape[0], ps, k), (dtype,), device)


def check_indices(batch: int, kv_indptr: object, kv_indices: object, kv_last_page_len: object,
                  device: torch.device, qo_indptr: object = None) -> None:
    check_tensor("kv_indptr", kv_indptr, (batch + 1,), (INDEX_DTYPE,), device)
    check_tensor("kv_indices", kv_indices, (None,), (INDEX_DTYPE,), device)
    if kv_last_page_len is not None:
        check_tensor("kv_last_page_len", kv_last_page_len, (batch,), (INDEX_DTYPE,), device)
    if qo_indptr is not None:
        check_tensor("qo_indptr", qo_indptr, (batch + 1,), (INDEX_DTYPE,), device)


def check_outputs(rows: int, spec: MLASpec, dtype: torch.dtype, device: torch.device,
                  out: object, lse: object) -> None:
    if out is not None:
        check_tensor("out", out, (rows, spec.num_heads, spec.head_dim_ckv), (dtype,), device)
    if lse is not None:
        check_tensor("lse", lse, (rows, spec.num_heads), (torch.float32,), device)


def check_host_data(spec: MLASpec, num_pages: int, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor | None, qo_indptr: torch.Tensor | None = None,
                    total_q: int | None = None) -> None:
    """The checks that need the index data on the host (copies it: a device sync). ``total_q``: the
    rows of q_nope, which qo_indptr[-1] must equal (prefill)."""
    indptr = kv_indptr.cpu().long()
    _check_indptr("kv_indptr", indptr, kv_indices.numel())
    ids = kv_indices.cpu().long()[: int(indptr[-1])]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
        bad = ids[(ids < 0) | (ids >= num_pages)][0]
        raise ValueError(f"kv_indices: expected page ids in [0, {num_pages}), found {int(bad)}")
    n_pages = indptr[1:] - indptr[:-1]
    if kv_last_page_len is not None:
        last = kv_last_page_len.cpu().long()
        bad = (n_pages > 0) & ((last < 1) | (last > spec.page_size))
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"kv_last_page_len: expected values in [1, {spec.page_size}] for sequences with "
                             f"pages, found {int(last[b])} at sequence {b}")
    if qo_indptr is not None:
        qo = qo_indptr.cpu().long()
        _check_indptr("qo_indptr", qo, None)
        if total_q is not None and int(qo[-1]) != total_q:
            raise ValueError(f"qo_indptr: expected the last value to equal the rows of q_nope ({total_q}), "
                             f"found {int(qo[-1])}")
        kv_len = kv_lengths(indptr, spec.page_size, None if kv_last_page_len is None else kv_last_page_len.cpu())
        q_len = qo[1:] - qo[:-1]
        bad = q_len > kv_len
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"qo_indptr: sequence {b} has q_len {int(q_len[b])} > kv_len {int(kv_len[b])} "
                             "(its queries are its last q_len tokens, so kv_len >= q_len is required)")


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
