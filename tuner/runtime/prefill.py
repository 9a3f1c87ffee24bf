"""Runtime API for prefill: the one-call :func:`mla_prefill` and the plan/run :class:`MLAPrefill`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, launch, ops, validate
from .config import PrefillConfig
from .spec import MLASpec


def _variant(causal: bool) -> str:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, found {type(causal).__name__}")
    return "prefill_causal" if causal else "prefill"


_ONE_CALL = launch.Plans()
"""The one-call form's plans, by everything a plan depends on (see :func:`mla_prefill`)."""


class _Plan(launch.LaunchPlan):
    """A prefill launch: the config's launch arguments."""

    def launch(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """The generated module's launch; ``tensors`` in :func:`_tensors`'s order."""
        self.module.launch(*tensors[:8], self.sm_scale, *tensors[8:10], **self.kwargs, **self.scales(tensors[10:]))


def _tensors(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
             qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
             page_size: int, scales: tuple = ()) -> tuple:
    """A call's tensors as the plan launches them, then an fp8 cache's two scales (floats or tensors)."""
    return (q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices,
            kv_last_page_len if page_size > 1 else None, out, lse, *scales)


def _check_all(spec: MLASpec, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
               kpe_cache: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
               kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None, out: torch.Tensor | None,
               lse: torch.Tensor | None, ckv_scale: object, kpe_scale: object) -> int:
    """The metadata checks of both forms; returns the batch size."""
    total_q, device = q_nope.shape[0], q_nope.device
    validate.check_inputs(spec, total_q, q_nope, q_pe, ckv_cache, kpe_cache)
    batch = validate._need_tensor("qo_indptr", qo_indptr).numel() - 1
    if batch < 0:
        raise ValueError("qo_indptr: expected at least one element, found 0")
    validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device, qo_indptr=qo_indptr)
    validate.check_outputs(total_q, spec, q_nope.dtype, device, out, lse)
    validate.check_scales(spec.fp8, ckv_scale, kpe_scale, ckv_cache.device)
    return batch


def _check_call(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                kv_last_page_len: torch.Tensor | None, sm_scale: float, causal: bool, out: torch.Tensor | None,
                lse: torch.Tensor | None, ckv_scale: object = None, kpe_scale: object = None) -> MLASpec:
    """The one-call form's metadata checks (clear errors naming the argument); returns the spec."""
    spec = validate.spec_from_tensors(_variant(causal), q_nope, q_pe, ckv_cache, kpe_cache)
    _check_all(spec, q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, out, lse,
               ckv_scale, kpe_scale)
    validate.check_sm_scale(sm_scale)
    return spec


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                kpe_cache: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                kv_indices: torch.Tensor, sm_scale: float,
                kv_last_page_len: torch.Tensor | None = None, *, causal: bool = True,
                out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                config: PrefillConfig | None = None,
                validate_data: bool = False, ckv_scale: validate.Scale | None = None,
                kpe_scale: validate.Scale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA prefill over a paged cache; positional order as FlashInfer-Bench's prefill definition.

    Args:
        q_nope: [total_q, H, ckv]; q_pe: [total_q, H, kpe]. bf16 or fp16, the dtype of the caches
            (float32 only under the Triton interpreter, as :func:`tuner.mla_decode`).
        ckv_cache, kpe_cache: [num_pages, page_size, ckv|kpe], last dimension contiguous; 16-bit (the
            queries' dtype), or an fp8 cache (both float8_e4m3fn) with ``ckv_scale`` and ``kpe_scale`` as
            :func:`tuner.mla_decode`'s.
        qo_indptr: int32 [B + 1], the queries of sequence b are rows qo_indptr[b]:qo_indptr[b + 1]:
            its last q_len tokens; qo_indptr[-1] must equal total_q. kv_indptr, kv_indices,
            kv_last_page_len: as :func:`tuner.mla_decode`.
        causal: query i of sequence b sees tokens 0 .. kv_len - q_len + i; False: all kv_len tokens.
        out, lse: optional outputs to write ([total_q, H, ckv] input dtype; [total_q, H] float32).
        config: launch parameters (default: the tuned dispatch table, else the default config).
        validate_data: also check the index data on the host (a device sync) before the launch. The
            environment variable ``MLA_TUNER_VALIDATE=1`` turns it on for every call.

    Returns:
        (output [total_q, H, ckv] in the input dtype, lse [total_q, H] float32, base 2).

    Always checked (tensor metadata, no sync): as :func:`tuner.mla_decode`, plus qo_indptr's dtype,
    device and length (B + 1). When qo_indptr is in host memory (CPU tensors: the interpreter), also
    ``qo_indptr[-1] == total_q``, which costs no sync there.

    NOT checked without ``validate_data``: that kv_indptr and qo_indptr start at 0 and never decrease
    and kv_indptr ends at most at len(kv_indices); that every page id is in [0, num_pages); that
    kv_last_page_len is in [1, page_size] for sequences with pages; on a GPU, that qo_indptr[-1] ==
    total_q (fewer leaves output rows unwritten, more reads and writes past q_nope and out); that
    kv_len >= q_len for every sequence (causal rows placed before position 0 see no token: output 0,
    lse -inf).
    Bad index data makes the kernel read outside its tensors: garbage, NaN, an illegal memory access on
    a GPU, a segfault under the interpreter. ``MLAPrefill.plan()`` checks all of it once per layout.
    """
    if ops.routed(q_nope):
        sm_scale = validate.check_sm_scale(sm_scale)
        text = ops.config_text(config)
        scales = ops.scale_args(ckv_scale, kpe_scale)
        if out is None and lse is None:
            return torch.ops.mla_tuner.prefill(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices,
                                               sm_scale, kv_last_page_len, causal, text, validate_data, *scales)
        out, lse = ops.missing_outputs(q_nope, out, lse)
        torch.ops.mla_tuner.prefill_out(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices,
                                        sm_scale, kv_last_page_len, out, lse, causal, text, validate_data, *scales)
        return out, lse
    metadata = launch.scaled_key(launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices,
                                                 kv_last_page_len, out, lse), ckv_scale, kpe_scale)
    key = None if metadata is None else (metadata, sm_scale, type(sm_scale), causal, type(causal), config)
    try:
        plan = _ONE_CALL.get(key)
    except TypeError:  # an unhashable argument: validation names it
        key, plan = None, None
    total_q = q_nope.shape[0] if plan is not None else 0
    if plan is None:
        spec = _check_call(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                           sm_scale, causal, out, lse, ckv_scale, kpe_scale)
        batch, total_q = qo_indptr.numel() - 1, q_nope.shape[0]
    if validate.data_validation(validate_data):
        validate.check_host_data(spec if plan is None else plan.spec, ckv_cache.shape[0], kv_indptr, kv_indices,
                                 kv_last_page_len, qo_indptr=qo_indptr, total_q=total_q)
    else:
        validate.check_total_q_if_on_host(qo_indptr, total_q)
    if plan is None:
        if config is None:
            avg_kv = kv_indices.numel() * spec.page_size / max(1, batch)
            config = dispatch.prefill_config(spec, total_q, avg_kv, q_nope.device)
        config.check_spec(spec)
        plan = _Plan(spec, total_q, float(sm_scale), q_nope.device, config.to_dict())
        if key is not None:
            _ONE_CALL.put(key, plan)
    out, lse = plan.outputs(q_nope.dtype, out, lse)
    plan.run((), _tensors(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                          out, lse, plan.spec.page_size, plan.scale_values(ckv_scale, kpe_scale)))
    return out, lse


class MLAPrefill:
    """Plan once per batch layout, then run (graph-capturable); see :class:`tuner.MLADecode`.

    ``run()`` also compares its q_nope's rows with ``qo_indptr[-1]`` as plan() read it (metadata only).
    """

    def __init__(self) -> None:
        self.spec: MLASpec | None = None
        self.config: PrefillConfig | None = None
        self.max_page_id: int | None = None
        self._plan: _Plan | None = None
        self.handle = ops.register(self)  # names this plan in torch.ops.mla_tuner.prefill_run

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor | None = None, *, num_heads: int, page_size: int,
             sm_scale: float, causal: bool = True, head_dim_ckv: int = 512, head_dim_kpe: int = 64,
             num_pages: int | None = None, config: PrefillConfig | None = None,
             validate_data: bool = True, kv_dtype: torch.dtype | None = None) -> MLAPrefill:
        """Check and record one batch layout (host work, one device sync); arguments as
        :meth:`tuner.MLADecode.plan` (``kv_dtype=torch.float8_e4m3fn`` for an fp8 cache), plus qo_indptr
        and causal as :func:`tuner.mla_prefill`. ``qo_indptr[-1]`` is read here (always) and compared with
        q_nope's rows at every run()."""
        variant = _variant(causal)
        batch = validate._need_tensor("qo_indptr", qo_indptr).numel() - 1
        if batch < 0:
            raise ValueError("qo_indptr: expected at least one element, found 0")
        device = qo_indptr.device
        fp8 = validate.check_kv_dtype(kv_dtype, device)
        spec = MLASpec(variant, num_heads, head_dim_ckv, head_dim_kpe, page_size, fp8)  # type: ignore[arg-type]
        validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device, qo_indptr=qo_indptr)
        sm_scale = validate.check_sm_scale(sm_scale)
        host = None
        if validate.data_validation(validate_data):
            host = validate.check_host_data(spec, num_pages, kv_indptr, kv_indices, kv_last_page_len,
                                            qo_indptr=qo_indptr)
        if host is not None and host.total_q is not None:
            total_q = host.total_q
        else:
            total_q = int(qo_indptr.cpu()[-1])
        if config is None:
            kv_lens = validate.layout_kv_lengths(host, kv_indptr, page_size, kv_last_page_len)
            config = dispatch.prefill_config(spec, total_q, int(kv_lens.sum()) / max(1, batch), device)
        config.check_spec(spec)
        self.spec, self.config, self.sm_scale, self.total_q = spec, config, sm_scale, total_q
        self.max_page_id = None if host is None else host.max_page_id
        self.batch, self.device = batch, device
        self.qo_indptr, self.kv_indptr = qo_indptr, kv_indptr
        self.kv_indices, self.kv_last_page_len = kv_indices, kv_last_page_len
        self._plan = _Plan(spec, total_q, sm_scale, device, config.to_dict())
        return self

    def check_run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                  out: torch.Tensor | None, lse: torch.Tensor | None, ckv_scale: object = None,
                  kpe_scale: object = None) -> _Plan:
        """run()'s checks of tensor metadata (clear errors naming the argument); returns the plan."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("MLAPrefill.run: call plan() first")
        _check_all(plan.spec, q_nope, q_pe, ckv_cache, kpe_cache, self.qo_indptr, self.kv_indptr,
                   self.kv_indices, self.kv_last_page_len, out, lse, ckv_scale, kpe_scale)
        if q_nope.shape[0] != self.total_q:
            raise ValueError(f"q_nope: expected {self.total_q} rows (qo_indptr[-1] at plan()), "
                             f"found {q_nope.shape[0]}")
        validate.check_planned_pages(self.max_page_id, ckv_cache)
        return plan

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, ckv_scale: validate.Scale | None = None,
            kpe_scale: validate.Scale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill with the planned layout; shapes as :func:`mla_prefill` (an fp8 cache's scales too). No
        host sync.

        Checks tensor metadata only, including q_nope's rows against the planned ``qo_indptr[-1]`` and
        the planned largest page id against ``ckv_cache.shape[0]`` (ValueErrors naming q_nope and
        kv_indices).
        """
        if ops.routed(q_nope):
            return ops.run_planned("prefill", self.handle, q_nope, q_pe, ckv_cache, kpe_cache, out, lse,
                                   ckv_scale, kpe_scale)
        key = launch.scaled_key(launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, out, lse), ckv_scale, kpe_scale)
        plan = self._plan
        if plan is None or plan.launches.get(key) is None:
            plan = self.check_run(q_nope, q_pe, ckv_cache, kpe_cache, out, lse, ckv_scale, kpe_scale)
        out, lse = plan.outputs(q_nope.dtype, out, lse)
        plan.run(key, _tensors(q_nope, q_pe, ckv_cache, kpe_cache, self.qo_indptr, self.kv_indptr, self.kv_indices,
                               self.kv_last_page_len, out, lse, plan.spec.page_size,
                               plan.scale_values(ckv_scale, kpe_scale)))
        return out, lse
