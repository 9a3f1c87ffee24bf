"""The runtime API as torch custom ops, so that compiled models trace through it.

``torch.ops.mla_tuner.decode`` / ``prefill`` (the one-call forms, returning new outputs),
``decode_out`` / ``prefill_out`` (writing given ``out`` and ``lse``) and ``decode_run`` / ``prefill_run``
(a planned :class:`~tuner.MLADecode` / :class:`~tuner.MLAPrefill`, named by its handle) are registered
with ``torch.library``. Their fake implementations check the tensors' metadata with the same validation
as the eager API (so bad input raises the same errors while tracing) and give the outputs' shapes and
dtypes without touching data.

``tuner.mla_decode`` and the others route here by themselves when called under ``torch.compile`` or with
tensor subclasses (fake tensors): a model calls the same API in eager mode, under ``FakeTensorMode`` and
under ``torch.compile(fullgraph=True)``, with no graph break. In eager mode they do not go through the
dispatcher (that would add host time); the ops' real implementations call the eager API.

An fp8 cache's scales travel as four optional arguments at the end (:func:`scale_args`: each scale as a
float or as a tensor, the other one None), since an op's schema gives every argument one type.

The decode ops take the 4-D queries [B, s_q, H, *] of speculative decoding too (``tuner.runtime.mtp``): their
fakes give out [B, s_q, H, ckv] and lse [B, s_q, H], and ``decode_run`` serves plans of any q_len.
"""

from __future__ import annotations

import functools
import json
import weakref
from typing import Any

import torch

from .config import DecodeConfig, PrefillConfig

_planned: dict[int, weakref.ref] = {}
_next_handle = [0]


def register(plan: Any) -> int:
    """A handle naming ``plan`` (an MLADecode or MLAPrefill) in the ``*_run`` ops."""
    _next_handle[0] += 1
    handle = _next_handle[0]
    _planned[handle] = weakref.ref(plan, lambda _, h=handle: _planned.pop(h, None))
    return handle


def planned(handle: int) -> Any:
    plan = _planned.get(handle)
    plan = plan() if plan is not None else None
    if plan is None:
        raise RuntimeError(f"mla_tuner: no live plan with handle {handle} (call plan() first, and keep the "
                           "MLADecode / MLAPrefill object alive while a compiled model uses it)")
    return plan


def routed(t: object) -> bool:
    """Whether a call with first tensor ``t`` goes through the custom ops: under torch.compile, or with a
    tensor subclass (FakeTensor, ...), never for a plain tensor in eager mode."""
    return torch.compiler.is_compiling() or (isinstance(t, torch.Tensor) and type(t) is not torch.Tensor)


@torch.compiler.assume_constant_result
def config_text(config: DecodeConfig | PrefillConfig | None) -> str | None:
    """A config as the ops take it (a JSON object, its kind under "kind")."""
    if config is None:
        return None
    return json.dumps({"kind": type(config).__name__, **config.to_dict()}, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _config(text: str | None) -> DecodeConfig | PrefillConfig | None:
    if text is None:
        return None
    data = json.loads(text)
    kind = {"DecodeConfig": DecodeConfig, "PrefillConfig": PrefillConfig}[data.pop("kind")]
    return kind.from_dict(data)


def scale_args(ckv_scale: Any, kpe_scale: Any) -> tuple[Any, Any, Any, Any]:
    """An fp8 cache's scales as the ops take them: (ckv float, ckv tensor, kpe float, kpe tensor), each scale
    in the slot of its kind and None in the other (a value of neither kind goes to the float slot, where the
    op's validation names it)."""
    return (None if isinstance(ckv_scale, torch.Tensor) else ckv_scale,
            ckv_scale if isinstance(ckv_scale, torch.Tensor) else None,
            None if isinstance(kpe_scale, torch.Tensor) else kpe_scale,
            kpe_scale if isinstance(kpe_scale, torch.Tensor) else None)


def _scales(ckv_f: float | None, ckv_t: torch.Tensor | None, kpe_f: float | None,
            kpe_t: torch.Tensor | None) -> dict[str, Any]:
    """The API's ``ckv_scale`` / ``kpe_scale`` back from :func:`scale_args`'s four slots."""
    return {"ckv_scale": ckv_t if ckv_t is not None else ckv_f, "kpe_scale": kpe_t if kpe_t is not None else kpe_f}


def missing_outputs(q_nope: torch.Tensor, out: torch.Tensor | None,
                     lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one of out and lse not given, allocated like the other (traceable: no host work)."""
    if out is None:
        assert lse is not None
        out = q_nope.new_empty(*lse.shape, q_nope.shape[-1])
    if lse is None:
        lse = q_nope.new_empty(*out.shape[:-1], dtype=torch.float32)
    return out, lse


def _empty_outputs(rows: tuple[int, ...], spec: Any, q_nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out [*rows, H, ckv] and lse [*rows, H]: ``rows`` (B,) or (total_q,), or (B, s_q) for 4-D queries; H the
    (validated) queries' heads (a packed speculative plan's spec has s_q * H)."""
    heads = q_nope.shape[-2]
    return (q_nope.new_empty(*rows, heads, spec.head_dim_ckv), q_nope.new_empty(*rows, heads, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------
# Decode

@torch.library.custom_op("mla_tuner::decode", mutates_args=())
def decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
           kv_last_page_len: torch.Tensor | None = None, config: str | None = None,
           validate_data: bool = False,
           ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
           kpe_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from .decode import mla_decode

    out, lse = mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len,
                          config=_config(config), validate_data=validate_data, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
    return out, lse


@decode.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len=None, config=None,
      validate_data=False, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
    from .decode import _check_call

    spec = _check_call(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale,
                       None, None, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
    return _empty_outputs(q_nope.shape[:-2], spec, q_nope)  # (B,) or, for queries [B, s_q, H, ckv], (B, s_q)


@torch.library.custom_op("mla_tuner::decode_out", mutates_args=("out", "lse"))
def decode_out(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
               kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
               kv_last_page_len: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
               config: str | None = None, validate_data: bool = False,
               ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
               kpe_t: torch.Tensor | None = None) -> None:
    from .decode import mla_decode

    mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len, out=out,
               lse=lse, config=_config(config), validate_data=validate_data, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))


@decode_out.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len, out, lse,
      config=None, validate_data=False, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
    from .decode import _check_call

    _check_call(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale, out, lse,
                **_scales(ckv_f, ckv_t, kpe_f, kpe_t))


# ---------------------------------------------------------------------------------------------------
# Prefill

@torch.library.custom_op("mla_tuner::prefill", mutates_args=())
def prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
            kv_last_page_len: torch.Tensor | None = None, causal: bool = True, config: str | None = None,
            validate_data: bool = False,
            ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
            kpe_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from .prefill import mla_prefill

    out, lse = mla_prefill(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, sm_scale,
                           kv_last_page_len, causal=causal, config=_config(config), validate_data=validate_data,
                           **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
    return out, lse


@prefill.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, sm_scale, kv_last_page_len=None,
      causal=True, config=None, validate_data=False, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
    from .prefill import _check_call

    spec = _check_call(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                       sm_scale, causal, None, None, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
    return _empty_outputs(q_nope.shape[:1], spec, q_nope)


@torch.library.custom_op("mla_tuner::prefill_out", mutates_args=("out", "lse"))
def prefill_out(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
                kv_last_page_len: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                config: str | None = None, validate_data: bool = False,
                ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
                kpe_t: torch.Tensor | None = None) -> None:
    from .prefill import mla_prefill

    mla_prefill(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, sm_scale, kv_last_page_len,
                causal=causal, out=out, lse=lse, config=_config(config), validate_data=validate_data,
                **_scales(ckv_f, ckv_t, kpe_f, kpe_t))


@prefill_out.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, sm_scale, kv_last_page_len, out, lse,
      causal=True, config=None, validate_data=False, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
    from .prefill import _check_call

    _check_call(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, sm_scale,
                causal, out, lse, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))


# ---------------------------------------------------------------------------------------------------
# Plan/run: the same pair of ops for MLADecode and MLAPrefill, each plan named by its handle


def _register_run_ops(kind: str) -> tuple[Any, Any]:
    """``mla_tuner::{kind}_run`` (new outputs) and ``{kind}_run_out`` (given out and lse) for a planned
    MLADecode (``kind`` "decode") or MLAPrefill ("prefill")."""

    @torch.library.custom_op(f"mla_tuner::{kind}_run", mutates_args=())
    def run(handle: int, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor,
            ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
            kpe_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = planned(handle).run(q_nope, q_pe, ckv_cache, kpe_cache, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
        return out, lse

    @run.register_fake
    def _(handle, q_nope, q_pe, ckv_cache, kpe_cache, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
        plan = planned(handle)
        plan.check_run(q_nope, q_pe, ckv_cache, kpe_cache, None, None, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))
        # checked: the query rows (decode [B] or [B, s_q], prefill [total_q]) are the outputs' rows
        return _empty_outputs(q_nope.shape[:-2], plan.spec, q_nope)

    @torch.library.custom_op(f"mla_tuner::{kind}_run_out", mutates_args=("out", "lse"))
    def run_out(handle: int, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                kpe_cache: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                ckv_f: float | None = None, ckv_t: torch.Tensor | None = None, kpe_f: float | None = None,
                kpe_t: torch.Tensor | None = None) -> None:
        planned(handle).run(q_nope, q_pe, ckv_cache, kpe_cache, out=out, lse=lse, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))

    @run_out.register_fake
    def _(handle, q_nope, q_pe, ckv_cache, kpe_cache, out, lse, ckv_f=None, ckv_t=None, kpe_f=None, kpe_t=None):
        planned(handle).check_run(q_nope, q_pe, ckv_cache, kpe_cache, out, lse, **_scales(ckv_f, ckv_t, kpe_f, kpe_t))

    return run, run_out


decode_run, decode_run_out = _register_run_ops("decode")
prefill_run, prefill_run_out = _register_run_ops("prefill")
_RUN_OPS = {"decode": (torch.ops.mla_tuner.decode_run, torch.ops.mla_tuner.decode_run_out),
            "prefill": (torch.ops.mla_tuner.prefill_run, torch.ops.mla_tuner.prefill_run_out)}


def run_planned(kind: str, handle: int, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                kpe_cache: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None,
                ckv_scale: Any = None, kpe_scale: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A planned run() through the ops (``kind`` "decode" or "prefill"): new outputs, or out and lse (the
    one not given allocated like the other)."""
    run, run_out = _RUN_OPS[kind]
    scales = scale_args(ckv_scale, kpe_scale)
    if out is None and lse is None:
        return run(handle, q_nope, q_pe, ckv_cache, kpe_cache, *scales)
    out, lse = missing_outputs(q_nope, out, lse)
    run_out(handle, q_nope, q_pe, ckv_cache, kpe_cache, out, lse, *scales)
    return out, lse


__all__ = ["config_text", "decode", "decode_out", "decode_run", "decode_run_out", "missing_outputs", "planned",
           "prefill", "prefill_out", "prefill_run", "prefill_run_out", "register", "routed", "run_planned",
           "scale_args"]
