"""Decode with several queries per request (speculative decoding, multi-token prediction): the queries
[B, s_q, H, *] of ``tuner.mla_decode`` and of ``MLADecode.plan(q_len=s_q)`` plans.

Query j of request b sits at position kv_len(b) - s_q + j and sees tokens 0 .. kv_len(b) - s_q + j, which is
the causal prefill of ``qo_indptr = arange(B + 1) * s_q`` over the same pages. Two kernels serve it:

- packed (:func:`kernel`, where s_q x H is a power of two up to :data:`MAX_PACKED_ROWS`): the decode kernel of
  ``s_q * H`` heads over the views [B, s_q * H, *], its rows r = j * H + h, launched with ``q_len = s_q``, so it
  reads each request's KV once for all of its s_q x H rows and masks per row only the tiles that reach the
  drafts (its dispatch is that of the decode kernel of s_q * H heads: the same work);
- otherwise, or with a ``PrefillConfig``: the causal prefill kernel (variant ``prefill_causal``, its dispatch at
  total_q = B * s_q) on the views [B * s_q, H, *].

s_q = 1 runs the decode kernel on the view [B, H, *]. This module holds what the 4-D form adds (its checks, the
views, the kernel choice, the plan of the causal prefill launch and its qo_indptr); ``tuner.runtime.decode``
the calls.
"""

from __future__ import annotations

import numbers
from dataclasses import replace

import torch

from . import validate
from .config import DecodeConfig, PrefillConfig
from .prefill import _Plan as _PrefillPlan
from .spec import MLASpec

MAX_QUERIES = 8
"""The most queries per request (draft tokens verified in one step) the 4-D form takes."""

MAX_PACKED_ROWS = 128
"""The most rows (s_q x H) per request the decode kernel packs; beyond, each 64-row group would read the KV
again, which is what the causal prefill kernel does anyway."""


def is_4d(t: object) -> bool:
    """Whether ``t`` is a tensor of queries [B, s_q, H, *] (the 4-D form)."""
    return isinstance(t, torch.Tensor) and t.dim() == 4


def variant(s_q: int) -> str:
    """The kernel that serves s_q queries per request: decode for one, else the causal prefill."""
    return "decode" if s_q == 1 else "prefill_causal"


def check_q_len(q_len: object) -> int:
    """``plan(q_len=...)``: an int in 1..MAX_QUERIES."""
    if not isinstance(q_len, numbers.Integral) or isinstance(q_len, bool):
        raise TypeError(f"q_len: expected an int, found {type(q_len).__name__}")
    if not 1 <= q_len <= MAX_QUERIES:
        raise ValueError(f"q_len: expected 1 to {MAX_QUERIES} queries per request, found {q_len}")
    return int(q_len)


def packed_spec(spec: MLASpec, s_q: int) -> MLASpec | None:
    """The decode kernel of s_q x H heads that runs s_q queries of ``spec``'s H heads per request packed as
    rows, or None where it does not pack them (s_q = 1, or s_q x H not a power of two up to MAX_PACKED_ROWS)."""
    rows = s_q * spec.num_heads
    if s_q == 1 or rows > MAX_PACKED_ROWS or rows & (rows - 1):
        return None
    return replace(spec, variant="decode", num_heads=rows)


def kernel(spec: MLASpec, s_q: int, config: object) -> MLASpec:
    """The spec of the kernel that runs s_q queries per request of ``spec`` (its heads, dims, page size and
    cache; any variant) under ``config``: the decode kernel at s_q = 1; else the packed decode kernel
    (:func:`packed_spec`) unless ``config`` is a PrefillConfig or it does not pack these shapes, then the
    causal prefill. A config of another kernel: TypeError naming it."""
    if s_q == 1:
        if config is not None and not isinstance(config, DecodeConfig):
            raise TypeError(f"config: expected a DecodeConfig for one query per request (the decode kernel runs "
                            f"it), found {type(config).__name__}")
        return replace(spec, variant="decode")
    packed = packed_spec(spec, s_q)
    if isinstance(config, DecodeConfig):
        if packed is None:
            raise TypeError(f"config: a DecodeConfig runs s_q x H rows per request packed in the decode kernel, "
                            f"which takes a power of two up to {MAX_PACKED_ROWS} rows; found s_q = {s_q} and "
                            f"H = {spec.num_heads} (pass a PrefillConfig: the causal prefill kernel runs them)")
        return packed
    if config is not None and not isinstance(config, PrefillConfig):
        raise TypeError(f"config: expected a DecodeConfig (the packed decode kernel) or a PrefillConfig (the "
                        f"causal prefill kernel) for s_q = {s_q} queries per request, found "
                        f"{type(config).__name__}")
    if isinstance(config, PrefillConfig) or packed is None:
        return replace(spec, variant="prefill_causal")
    return packed


def packed(t: torch.Tensor) -> torch.Tensor:
    """[B, s_q, H, *rest] -> the view [B, s_q * H, *rest] of a tensor :func:`check_packed` accepted."""
    return t.flatten(1, 2)


def check_packed(*named: tuple[str, object]) -> None:
    """Each given tensor [B, s_q, H, ...] viewable as [B, s_q * H, ...] (what the packed decode kernel reads
    and writes; never a copy), else a ValueError naming it."""
    for name, t in named:
        if t is not None:
            assert isinstance(t, torch.Tensor)
            _merged(name, t, 1, "[B, s_q, H, ...] whose axes 1 and 2 can be viewed as one of s_q * H rows (stride(1) "
                                "== H * stride(2)), which the packed decode kernel reads;")


def rows(t: torch.Tensor) -> torch.Tensor:
    """[B, s_q, *rest] -> the view [B * s_q, *rest] of a tensor :func:`rows_view` accepted (or one of the same
    shape and strides: then flatten is a view, and the cheapest way to it)."""
    return t.flatten(0, 1)


def rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """:func:`rows`, or a ValueError naming ``t`` where its first two dimensions cannot be one (never a copy)."""
    return _merged(name, t, 0, "[B, s_q, ...] whose first two dimensions can be viewed as one of B * s_q rows "
                               "(stride(0) == s_q * stride(1)),")


def _merged(name: str, t: torch.Tensor, axis: int, expected: str) -> torch.Tensor:
    """``t`` with axes ``axis`` and ``axis + 1`` viewed as one (never a copy), else a ValueError naming it:
    "{name}: expected {expected} found shape ... with strides ..."."""
    shape = t.shape
    try:
        return t.view(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])
    except RuntimeError:
        raise ValueError(f"{name}: expected {expected} found shape {tuple(shape)} with strides {t.stride()}") from None


def check_queries(q_nope: object, q_pe: object, batch: int | None = None,
                  s_q: int | None = None) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """q_nope [B, s_q, H, ckv] and q_pe [B, s_q, H, kpe] agreeing on B, s_q and H, s_q in 1..MAX_QUERIES (a
    plan's ``batch`` and ``s_q`` where given); returns (B, s_q) and the views [B * s_q, H, *] of both, for the
    checks of the 3-D form (dtypes, head dims, devices, strides)."""
    planned = "" if s_q is None else f" (the plan's q_len = {s_q})"
    for name, t, dim in (("q_nope", q_nope, "ckv"), ("q_pe", q_pe, "kpe")):
        t = validate._need_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions [B, s_q, H, {dim}]{planned}, found {t.dim()} "
                             f"(shape {tuple(t.shape)})")
    assert isinstance(q_nope, torch.Tensor) and isinstance(q_pe, torch.Tensor)
    found = q_nope.shape[1]
    if s_q is not None and found != s_q:
        raise ValueError(f"q_nope: expected s_q = {s_q} (the plan's q_len; axis 1 of [B, s_q, H, ckv]), found "
                         f"{found} (shape {tuple(q_nope.shape)})")
    if not 1 <= found <= MAX_QUERIES:
        raise ValueError(f"q_nope: expected 1 to {MAX_QUERIES} queries per request (axis 1 of [B, s_q, H, ckv]), "
                         f"found {found} (shape {tuple(q_nope.shape)})")
    validate.check_tensor("q_nope", q_nope, (batch, found, None, None), None)
    validate.check_tensor("q_pe", q_pe, (q_nope.shape[0], found, q_nope.shape[2], None), None)
    return q_nope.shape[0], found, rows_view("q_nope", q_nope), rows_view("q_pe", q_pe)


def check_outputs(batch: int, s_q: int, spec: MLASpec, dtype: torch.dtype, device: torch.device,
                  out: object, lse: object) -> None:
    """out [B, s_q, H, ckv] and lse [B, s_q, H] (as :func:`validate.check_outputs`), each viewable as rows."""
    validate.check_outputs((batch, s_q), spec, dtype, device, out, lse)
    for name, t in (("out", out), ("lse", lse)):
        if t is not None:
            rows_view(name, t)  # type: ignore[arg-type]


def outputs(out: torch.Tensor | None, lse: torch.Tensor | None, batch: int, s_q: int, heads: int,
            out_rows: torch.Tensor, lse_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A call's outputs as [B, s_q, H, ckv] and [B, s_q, H]: ``out`` and ``lse`` where given, else views of the
    rows the kernel wrote ([B * s_q, H, *] or, packed, [B, s_q * H, *])."""
    if out is None:
        out = out_rows.view(batch, s_q, heads, out_rows.shape[-1])
    if lse is None:
        lse = lse_rows.view(batch, s_q, heads)
    return out, lse


class CausalPlan(_PrefillPlan):
    """The causal prefill launch of B requests of s_q queries each: B * s_q rows and the qo_indptr
    ``arange(B + 1) * s_q`` (:func:`qo_indptr`), kept once it may be."""

    def __init__(self, spec: MLASpec, config: PrefillConfig, batch: int, s_q: int, sm_scale: float,
                 device: torch.device) -> None:
        super().__init__(spec, batch * s_q, sm_scale, device, config.to_dict())
        self.batch, self.s_q = batch, s_q
        self._qo_indptr: torch.Tensor | None = None

    def qo_indptr(self) -> torch.Tensor:
        qo = self._qo_indptr
        if qo is None:
            qo, keep = qo_indptr(self.batch, self.s_q, self.device)
            if keep:
                self._qo_indptr = qo
        return qo


class _Held:
    """``arange(n) * s_q`` on a device, and the event recorded after it was made (None once it has run)."""

    __slots__ = ("tensor", "event")

    def __init__(self, tensor: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self.tensor, self.event = tensor, event


_HELD: dict[tuple[int, torch.device], _Held] = {}
_KEPT: list[_Held] = []
"""Every tensor :func:`qo_indptr` made outside a capture, never freed (a captured graph may read it)."""


def _arange(n: int, s_q: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, n * s_q, s_q, dtype=validate.INDEX_DTYPE, device=device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _made(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded on the current stream of ``device`` (None off CUDA: nothing is pending there)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _pending(event: torch.cuda.Event, device: torch.device) -> bool:
    """Whether the work before ``event`` may not have run yet; then the current stream waits for it
    (no host sync: cudaEventQuery does not block)."""
    if event.query():
        return False
    torch.cuda.current_stream(device).wait_event(event)
    return True


def qo_indptr(batch: int, s_q: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``arange(batch + 1) * s_q`` (int32 on ``device``) with no host sync, and whether the caller may keep it.

    A prefix (view) of one tensor per (s_q, device), made by a kernel on first use (again, twice as long, for
    a larger batch) and never freed, so that a CUDA graph that captured a launch reading it stays valid
    whatever the callers' caches forget. While a CUDA graph is being captured a new one is made inside the
    graph instead (a kernel captured now runs only at replay), not to be kept. Until the kernel that made it
    has been seen to run, the current stream waits for it (another stream may use it first) and the result is
    not to be kept either.
    """
    key = (s_q, device)
    held = _HELD.get(key)
    capturing = _capturing(device)
    if held is None or held.tensor.numel() <= batch:
        if capturing:
            return _arange(batch + 1, s_q, device), False
        size = max(64, batch + 1, 2 * (held.tensor.numel() if held is not None else 0))
        held = _Held(_arange(size, s_q, device), _made(device))
        _HELD[key] = held
        _KEPT.append(held)
    if held.event is not None:
        if capturing:
            return _arange(batch + 1, s_q, device), False
        if _pending(held.event, device):
            return held.tensor[: batch + 1], False
        held.event = None
    return held.tensor[: batch + 1], True
