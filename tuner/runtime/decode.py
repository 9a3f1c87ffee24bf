"""Runtime API for decode: the one-call :func:`mla_decode` and the plan/run :class:`MLADecode`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, launch, mtp, ops, prefill, validate
from .config import DecodeConfig, PrefillConfig
from .device import gpu_info
from .spec import MLASpec

_HOST_ONLY = ("programs_per_sm", "split_tokens", "align")  # config fields the runtime turns into num_programs
_ONE_CALL = launch.Plans()
"""The one-call form's plans, by everything a plan depends on (see :func:`mla_decode`); the keys of 3-D and
4-D queries never meet (the shapes are in the key)."""


class _Plan(launch.LaunchPlan):
    """A decode launch: the config's launch arguments and its split (shares and scratch rows); with q_len > 1,
    q_len queries per request packed as the spec's heads (tuner.runtime.mtp)."""

    def __init__(self, spec: MLASpec, config: DecodeConfig, batch: int, max_tokens: int, sm_scale: float,
                 device: torch.device, q_len: int = 1) -> None:
        kwargs = {k: v for k, v in config.to_dict().items() if k not in _HOST_ONLY}
        if q_len > 1:
            kwargs["q_len"] = q_len
        super().__init__(spec, batch, sm_scale, device, kwargs)
        self.num_programs = config.num_programs(spec, gpu_info(device).num_sms, max_tokens, batch)
        self.scratch_rows = self.module.scratch_rows(batch, self.num_programs)

    def scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial_out, partial_lse): float32 split scratch."""
        return (torch.empty(self.scratch_rows * self.spec.head_dim_ckv, dtype=torch.float32, device=self.device),
                torch.empty(self.scratch_rows, dtype=torch.float32, device=self.device))

    def launch(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """The generated module's launch; ``tensors`` in :func:`_tensors`'s order."""
        self.module.launch(*tensors[:7], self.sm_scale, *tensors[7:11], self.num_programs, **self.kwargs,
                           **self.scales(tensors[11:]))


def _tensors(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
             kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None,
             out: torch.Tensor, lse: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor],
             page_size: int, scales: tuple = ()) -> tuple:
    """A call's tensors as the plan launches them, then an fp8 cache's two scales (floats or tensors)."""
    return (q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices,
            kv_last_page_len if page_size > 1 else None, out, lse, *scratch, *scales)


def _make_plan(spec: MLASpec, config: DecodeConfig | PrefillConfig | None, batch: int, s_q: int, kv_tokens: int,
               avg_kv: float, sm_scale: float, device: torch.device
               ) -> tuple[DecodeConfig | PrefillConfig, launch.LaunchPlan]:
    """The config (given, else the dispatch's: decode for B requests of s_q x H packed rows, or the causal
    prefill of B * s_q queries: tuner.runtime.mtp.kernel) and the launch plan of B requests of s_q queries
    over ``kv_tokens`` page slots in all."""
    spec = mtp.kernel(spec, s_q, config)
    if config is None:
        config = (dispatch.decode_config(spec, batch, avg_kv, device) if spec.is_decode
                  else dispatch.prefill_config(spec, batch * s_q, avg_kv, device))
    config.check_spec(spec)
    if isinstance(config, PrefillConfig):
        return config, mtp.CausalPlan(spec, config, batch, s_q, sm_scale, device)
    return config, _Plan(spec, config, batch, kv_tokens, sm_scale, device, s_q)


def _run_queries(plan: launch.LaunchPlan, key: object, q_nope: torch.Tensor, q_pe: torch.Tensor,
                 ckv_cache: torch.Tensor, kpe_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 kv_last_page_len: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor | None,
                 scratch: tuple[torch.Tensor, torch.Tensor] | None, scales: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a validated call of queries [B, s_q, H, *] (tuner.runtime.mtp): the causal prefill of s_q queries
    per request on the views [B * s_q, H, *], or the decode kernel on the views [B, s_q * H, *] (packed; at
    s_q = 1 plain decode). Returns [B, s_q, H, ckv] and [B, s_q, H] (``out`` and ``lse`` themselves where
    given)."""
    batch, s_q = q_nope.shape[:2]
    causal = isinstance(plan, mtp.CausalPlan)
    view = mtp.rows if causal else mtp.packed
    out_rows, lse_rows = plan.outputs(q_nope.dtype, None if out is None else view(out),
                                      None if lse is None else view(lse))
    ps = plan.spec.page_size
    if causal:
        tensors = prefill._tensors(view(q_nope), view(q_pe), ckv_cache, kpe_cache, plan.qo_indptr(),
                                   kv_indptr, kv_indices, kv_last_page_len, out_rows, lse_rows, ps, scales)
    else:
        assert isinstance(plan, _Plan)
        tensors = _tensors(view(q_nope), view(q_pe), ckv_cache, kpe_cache, kv_indptr, kv_indices,
                           kv_last_page_len, out_rows, lse_rows, plan.scratch() if scratch is None else scratch, ps,
                           scales)
    plan.run(key, tensors)
    return mtp.outputs(out, lse, batch, s_q, q_nope.shape[2], out_rows, lse_rows)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
               kpe_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
               sm_scale: float, kv_last_page_len: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
               config: DecodeConfig | PrefillConfig | None = None,
               validate_data: bool = False, ckv_scale: validate.Scale | None = None,
               kpe_scale: validate.Scale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged cache (``docs/contract.md``); positional order as FlashInfer-Bench.

    Args:
        q_nope: [B, H, ckv]; q_pe: [B, H, kpe]. bf16 or fp16, the dtype of the caches. float32 is a
            test dtype, accepted only under the Triton interpreter (CPU tensors or ``TRITON_INTERPRET``);
            on a GPU it raises a TypeError naming the tensor.
            Several queries per request (speculative decoding): q_nope [B, s_q, H, ckv], q_pe [B, s_q, H,
            kpe], s_q in 1..8. Query j of request b sits at position kv_len(b) - s_q + j and sees tokens
            0 .. kv_len(b) - s_q + j (causal among the drafts: the causal prefill of s_q queries per request,
            which is what runs, on the views [B * s_q, H, *]; s_q = 1 runs the decode kernel). The first two
            dimensions must be viewable as one (stride(0) == s_q * stride(1)), else a ValueError names the
            tensor; nothing is copied.
        ckv_cache: [num_pages, page_size, ckv]; kpe_cache: [num_pages, page_size, kpe], one dtype (they
            define it), or both float8_e4m3fn (an fp8 cache: the queries stay 16-bit, the output is in their
            dtype; needs ``ckv_scale`` and ``kpe_scale``, and a GPU of compute capability 8.9 or newer).
            Strided views are fine as long as the last dimension is contiguous.
        kv_indptr: int32 [B + 1]; kv_indices: int32, the pages of sequence b are
            kv_indices[kv_indptr[b]:kv_indptr[b + 1]].
        sm_scale: softmax scale (a Python float).
        kv_last_page_len: int32 [B], tokens used in each last page (default: pages full;
            ignored at page_size 1).
        out, lse: optional outputs to write ([B, H, ckv] input dtype; [B, H] float32; with 4-D queries
            [B, s_q, H, ckv] and [B, s_q, H], viewable as rows like the queries).
        config: launch parameters (default: the tuned dispatch table, else the default config); a
            PrefillConfig for 4-D queries with s_q > 1 (the causal prefill kernel runs them).
        validate_data: also check the index data on the host (a device sync) before the launch. The
            environment variable ``MLA_TUNER_VALIDATE=1`` turns it on for every call.
        ckv_scale, kpe_scale: an fp8 cache's per-tensor scales (a cached value is fp8 * scale): each a
            finite positive float, or a one-element float32 tensor on the cache's device (read by the
            kernel, so a captured graph follows a changing value; not checked on the host). Given with a
            16-bit cache, or missing with an fp8 one: a ValueError naming it.

    Returns:
        (output [B, H, ckv] in the input dtype, lse [B, H] float32, base 2); with 4-D queries
        (output [B, s_q, H, ckv], lse [B, s_q, H]).

    Always checked (tensor metadata, no sync): dtypes, ranks, shapes against the specialization,
    devices, int32 indices, the lengths of kv_indptr (B + 1) and kv_last_page_len (B), sm_scale,
    contiguous last dimensions, strides; with 4-D queries, s_q in 1..8 and q_nope, q_pe, out and lse
    agreeing on B and s_q.

    NOT checked without ``validate_data`` (the index *data*, which lives on the device): that kv_indptr
    starts at 0, never decreases and ends at most at len(kv_indices); that every page id is in
    [0, num_pages); that kv_last_page_len is in [1, page_size] for sequences with pages. Such input
    makes the kernel read outside the cache: garbage, NaN, an illegal memory access on a GPU, a
    segfault under the interpreter. ``MLADecode.plan()`` checks all of it once per layout. With s_q > 1,
    also that kv_len >= s_q for every request: unchecked, a request with fewer tokens gets output 0 and
    lse -inf for its queries placed before position 0 (they see no token), as the causal prefill's rule.

    No host synchronisation unless ``validate_data``: the call can be captured in a CUDA graph.
    The config is chosen from B and the average pages per request (``kv_indices.numel() / B``), both
    known on the host without a sync; the split is balanced on the device (see the generated module).
    With 4-D queries and s_q > 1, the causal prefill's config for B * s_q queries; its qo_indptr
    (arange(B + 1) * s_q) is made on the device without a sync and kept with the plan of the call's
    metadata (a view of one tensor per (s_q, device), never freed: tuner.runtime.mtp.qo_indptr).
    """
    if ops.routed(q_nope):
        return _routed(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len,
                       out, lse, config, validate_data, ckv_scale, kpe_scale)
    four_d = mtp.is_4d(q_nope)
    metadata = launch.scaled_key(launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices,
                                                 kv_last_page_len, out, lse), ckv_scale, kpe_scale)
    # with the types: True == 1 == 1.0 as keys, but only some of them pass validation
    key = None if metadata is None else (metadata, sm_scale, type(sm_scale), config)
    try:
        plan = _ONE_CALL.get(key)
    except TypeError:  # an unhashable argument: validation names it
        key, plan = None, None
    if plan is None:
        spec = _check_call(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len,
                           sm_scale, out, lse, ckv_scale, kpe_scale, config)
    s_q = q_nope.shape[1] if four_d else 1
    if validate.data_validation(validate_data):
        validate.check_host_data(spec if plan is None else plan.spec, ckv_cache.shape[0], kv_indptr, kv_indices,
                                 kv_last_page_len, s_q=s_q)
    if plan is None:
        batch, kv_tokens = q_nope.shape[0], kv_indices.numel() * spec.page_size
        plan = _make_plan(spec, config, batch, s_q, kv_tokens, kv_tokens / max(1, batch), float(sm_scale),
                          q_nope.device)[1]
        if key is not None:
            _ONE_CALL.put(key, plan)
    scales = plan.scale_values(ckv_scale, kpe_scale)
    if four_d:
        return _run_queries(plan, (), q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len,
                            out, lse, None, scales)
    out, lse = plan.outputs(q_nope.dtype, out, lse)
    plan.run((), _tensors(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len, out, lse,
                          plan.scratch(), plan.spec.page_size, scales))
    return out, lse


def _routed(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
            kv_last_page_len: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor | None,
            config: DecodeConfig | PrefillConfig | None, validate_data: bool, ckv_scale: validate.Scale | None,
            kpe_scale: validate.Scale | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mla_decode` through the custom ops (torch.compile, fake tensors; tuner.runtime.ops)."""
    sm_scale = validate.check_sm_scale(sm_scale)
    text = ops.config_text(config)
    scales = ops.scale_args(ckv_scale, kpe_scale)
    if out is None and lse is None:
        return torch.ops.mla_tuner.decode(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale,
                                          kv_last_page_len, text, validate_data, *scales)
    out, lse = ops.missing_outputs(q_nope, out, lse)
    torch.ops.mla_tuner.decode_out(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale,
                                   kv_last_page_len, out, lse, text, validate_data, *scales)
    return out, lse


def _check_call(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None,
                sm_scale: float, out: torch.Tensor | None, lse: torch.Tensor | None,
                ckv_scale: object = None, kpe_scale: object = None, config: object = None) -> MLASpec:
    """The one-call form's metadata checks (clear errors naming the argument); returns the spec of the
    operation (the causal prefill's for 4-D queries with s_q > 1; tuner.runtime.mtp.kernel says which kernel
    runs it)."""
    four_d = mtp.is_4d(q_nope)
    s_q = 1
    given = (("q_nope", q_nope), ("q_pe", q_pe), ("out", out), ("lse", lse))
    if four_d:
        _, s_q, q_nope, q_pe = mtp.check_queries(q_nope, q_pe)
    spec = validate.spec_from_tensors(mtp.variant(s_q), q_nope, q_pe, ckv_cache, kpe_cache)
    batch, device = q_nope.shape[0] // s_q, q_nope.device
    validate.check_inputs(spec, batch * s_q, q_nope, q_pe, ckv_cache, kpe_cache)
    validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device)
    validate.check_sm_scale(sm_scale)
    validate.check_scales(spec.fp8, ckv_scale, kpe_scale, ckv_cache.device)
    if four_d:
        mtp.check_outputs(batch, s_q, spec, q_nope.dtype, device, out, lse)
        if s_q > 1 and mtp.kernel(spec, s_q, config).is_decode:
            mtp.check_packed(*given)
    else:
        validate.check_outputs(batch, spec, q_nope.dtype, device, out, lse)
    return spec


class MLADecode:
    """Plan once per batch layout, then run (graph-capturable) as often as needed.

    ``plan()`` does the host work: it derives the spec, checks the index data on the host (one
    copy, the only sync), picks the config from the exact batch size and mean KV length, and
    allocates the split scratch. ``run()`` only checks tensor metadata and launches: among them, the
    largest page id plan() saw against the pages of the caches run() is given (``shape[0]``), so an
    out-of-range page id raises a ValueError even when plan() was not told ``num_pages``.
    The index tensors given to ``plan()`` are kept and read by every ``run()``: to replay a captured
    graph on a new layout of the same shape, update them in place (data written after plan() is not
    checked: plan again to check it).

    ``plan(q_len=s_q)`` with s_q > 1 serves speculative decoding: run() then takes queries [B, s_q, H, *]
    (see :func:`mla_decode`) and launches the decode kernel of s_q * H heads with the s_q x H rows of a
    request packed (where s_q * H is a power of two up to 128; ``config`` a DecodeConfig), else the causal
    prefill kernel with the qo_indptr arange(B + 1) * s_q made in plan() (``config`` a PrefillConfig).
    ``spec`` is the generated kernel that runs.
    """

    def __init__(self) -> None:
        self.spec: MLASpec | None = None
        self.config: DecodeConfig | PrefillConfig | None = None
        self.max_page_id: int | None = None
        self.q_len = 1
        self._io_spec: MLASpec | None = None
        self._plan: launch.LaunchPlan | None = None
        self.handle = ops.register(self)  # names this plan in torch.ops.mla_tuner.decode_run

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor | None = None, *, num_heads: int, page_size: int,
             sm_scale: float, head_dim_ckv: int = 512, head_dim_kpe: int = 64,
             num_pages: int | None = None, config: DecodeConfig | PrefillConfig | None = None,
             validate_data: bool = True, q_len: int = 1, kv_dtype: torch.dtype | None = None) -> MLADecode:
        """Check and record one batch layout (host work, one device sync).

        Args:
            kv_indptr, kv_indices, kv_last_page_len: as :func:`mla_decode`; kept for every run().
            num_heads, page_size, head_dim_ckv, head_dim_kpe: the specialization.
            sm_scale: softmax scale (a Python float).
            num_pages: the cache's page count, if known: page ids are then checked here already;
                without it run() compares the largest page id with the cache it is given.
            config: launch parameters (default: the tuned dispatch table, else the default config); a
                PrefillConfig when q_len > 1.
            validate_data: check the index data on the host (default; ``MLA_TUNER_VALIDATE=1`` forces
                it). False skips every data check, including run()'s page-id bound and, with q_len > 1,
                kv_len >= q_len (a request with fewer tokens gets output 0, lse -inf for its queries
                placed before position 0).
            q_len: queries per request, 1 to 8 (speculative decoding: the request's last q_len tokens).
                run() takes queries [B, q_len, H, *] (q_len 1: [B, H, *] or [B, 1, H, *]). With q_len > 1
                the config is the causal prefill's for B * q_len queries, and kv_len >= q_len is checked
                with the index data (ValueError naming kv_indptr).
            kv_dtype: the caches' dtype: None (the default), torch.bfloat16 or torch.float16 for a 16-bit
                cache (the queries' dtype), torch.float8_e4m3fn for an fp8 cache (run() then needs its
                ``ckv_scale`` and ``kpe_scale``).
        """
        q_len = mtp.check_q_len(q_len)
        batch = validate._need_tensor("kv_indptr", kv_indptr).numel() - 1
        if batch < 0:
            raise ValueError("kv_indptr: expected at least one element, found 0")
        device = kv_indptr.device
        fp8 = validate.check_kv_dtype(kv_dtype, device)
        spec = MLASpec(mtp.variant(q_len), num_heads, head_dim_ckv, head_dim_kpe, page_size, fp8)  # type: ignore[arg-type]
        validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device)
        sm_scale = validate.check_sm_scale(sm_scale)
        host = None
        if validate.data_validation(validate_data):
            host = validate.check_host_data(spec, num_pages, kv_indptr, kv_indices, kv_last_page_len, s_q=q_len)
        avg_kv = 0.0
        if config is None:
            kv_lens = validate.layout_kv_lengths(host, kv_indptr, page_size, kv_last_page_len)
            avg_kv = int(kv_lens.sum()) / max(1, batch)
        config, plan = _make_plan(spec, config, batch, q_len, kv_indices.numel() * page_size, avg_kv, sm_scale, device)
        self.spec, self.config, self.sm_scale, self.q_len = plan.spec, config, sm_scale, q_len
        self._io_spec = spec  # what run()'s tensors are checked against (H heads, not packed rows)
        self.max_page_id = None if host is None else host.max_page_id
        self.batch, self.device = batch, device
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = kv_indptr, kv_indices, kv_last_page_len
        self._plan = plan
        if isinstance(plan, mtp.CausalPlan):
            self.scratch = None
            plan.qo_indptr()  # made here, once (kept by the plan)
        else:
            assert isinstance(plan, _Plan)
            self.scratch = plan.scratch()
        return self

    def check_run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                  out: torch.Tensor | None, lse: torch.Tensor | None, ckv_scale: object = None,
                  kpe_scale: object = None) -> launch.LaunchPlan:
        """run()'s checks of tensor metadata (clear errors naming the argument); returns the plan."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("MLADecode.run: call plan() first")
        four_d = self.q_len != 1 or mtp.is_4d(q_nope)
        given = (("q_nope", q_nope), ("q_pe", q_pe), ("out", out), ("lse", lse))
        if four_d:
            _, _, q_nope, q_pe = mtp.check_queries(q_nope, q_pe, self.batch, self.q_len)
        spec = self._io_spec
        validate.check_inputs(spec, self.batch * self.q_len, q_nope, q_pe, ckv_cache, kpe_cache)
        if q_nope.device != self.device:
            raise ValueError(f"q_nope: expected device {self.device} (the planned one), found {q_nope.device}")
        if four_d:
            mtp.check_outputs(self.batch, self.q_len, spec, q_nope.dtype, self.device, out, lse)
            if self.q_len > 1 and plan.spec.is_decode:
                mtp.check_packed(*given)
        else:
            validate.check_outputs(self.batch, spec, q_nope.dtype, self.device, out, lse)
        validate.check_planned_pages(self.max_page_id, ckv_cache)
        validate.check_scales(plan.spec.fp8, ckv_scale, kpe_scale, ckv_cache.device)
        return plan

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, ckv_scale: validate.Scale | None = None,
            kpe_scale: validate.Scale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with the planned layout; shapes as :func:`mla_decode`, queries [B, q_len, H, *] for a plan
        of q_len > 1 (other queries: a ValueError naming q_nope). No host sync.

        Checks tensor metadata only, including the planned largest page id against
        ``ckv_cache.shape[0]`` (ValueError naming kv_indices). With an fp8 cache (``plan(kv_dtype=
        torch.float8_e4m3fn)``): ``ckv_scale`` and ``kpe_scale`` as :func:`mla_decode`'s.
        """
        if ops.routed(q_nope):
            return ops.run_planned("decode", self.handle, q_nope, q_pe, ckv_cache, kpe_cache, out, lse,
                                   ckv_scale, kpe_scale)
        key = launch.scaled_key(launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, out, lse), ckv_scale, kpe_scale)
        plan = self._plan
        if plan is None or plan.launches.get(key) is None:
            plan = self.check_run(q_nope, q_pe, ckv_cache, kpe_cache, out, lse, ckv_scale, kpe_scale)
        scales = plan.scale_values(ckv_scale, kpe_scale)
        if q_nope.dim() == 4:
            return _run_queries(plan, key, q_nope, q_pe, ckv_cache, kpe_cache, self.kv_indptr, self.kv_indices,
                                self.kv_last_page_len, out, lse, self.scratch, scales)
        out, lse = plan.outputs(q_nope.dtype, out, lse)
        plan.run(key, _tensors(q_nope, q_pe, ckv_cache, kpe_cache, self.kv_indptr, self.kv_indices,
                               self.kv_last_page_len, out, lse, self.scratch, plan.spec.page_size, scales))
        return out, lse
