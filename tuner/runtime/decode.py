"""Runtime API for decode: the one-call :func:`mla_decode` and the plan/run :class:`MLADecode`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, launch, ops, validate
from .config import DecodeConfig
from .device import gpu_info
from .spec import MLASpec

_HOST_ONLY = ("programs_per_sm", "split_tokens", "align")  # config fields the runtime turns into num_programs
_ONE_CALL = launch.Plans()
"""The one-call form's plans, by everything a plan depends on (see :func:`mla_decode`)."""


class _Plan(launch.LaunchPlan):
    """A decode launch: the config's launch arguments and its split (shares and scratch rows)."""

    def __init__(self, spec: MLASpec, config: DecodeConfig, batch: int, max_tokens: int, sm_scale: float,
                 device: torch.device) -> None:
        super().__init__(spec, batch, sm_scale, device,
                         {k: v for k, v in config.to_dict().items() if k not in _HOST_ONLY})
        self.num_programs = config.num_programs(spec, gpu_info(device).num_sms, max_tokens, batch)
        self.scratch_rows = self.module.scratch_rows(batch, self.num_programs)

    def scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial_out, partial_lse): float32 split scratch."""
        return (torch.empty(self.scratch_rows * self.spec.head_dim_ckv, dtype=torch.float32, device=self.device),
                torch.empty(self.scratch_rows, dtype=torch.float32, device=self.device))

    def launch(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """The generated module's launch; ``tensors`` in :func:`_tensors`'s order."""
        self.module.launch(*tensors[:7], self.sm_scale, *tensors[7:], self.num_programs, **self.kwargs)


def _tensors(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
             kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None,
             out: torch.Tensor, lse: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor],
             page_size: int) -> tuple[torch.Tensor | None, ...]:
    return (q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices,
            kv_last_page_len if page_size > 1 else None, out, lse, *scratch)


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
               kpe_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
               sm_scale: float, kv_last_page_len: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
               config: DecodeConfig | None = None,
               validate_data: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode over a paged cache (``docs/contract.md``); positional order as FlashInfer-Bench.

    Args:
        q_nope: [B, H, ckv]; q_pe: [B, H, kpe]. bf16 or fp16, the dtype of the caches. float32 is a
            test dtype, accepted only under the Triton interpreter (CPU tensors or ``TRITON_INTERPRET``);
            on a GPU it raises a TypeError naming the tensor.
        ckv_cache: [num_pages, page_size, ckv]; kpe_cache: [num_pages, page_size, kpe], one dtype (they
            define it). Strided views are fine as long as the last dimension is contiguous.
        kv_indptr: int32 [B + 1]; kv_indices: int32, the pages of sequence b are
            kv_indices[kv_indptr[b]:kv_indptr[b + 1]].
        sm_scale: softmax scale (a Python float).
        kv_last_page_len: int32 [B], tokens used in each last page (default: pages full;
            ignored at page_size 1).
        out, lse: optional outputs to write ([B, H, ckv] input dtype; [B, H] float32).
        config: launch parameters (default: the tuned dispatch table, else the default config).
        validate_data: also check the index data on the host (a device sync) before the launch. The
            environment variable ``MLA_TUNER_VALIDATE=1`` turns it on for every call.

    Returns:
        (output [B, H, ckv] in the input dtype, lse [B, H] float32, base 2).

    Always checked (tensor metadata, no sync): dtypes, ranks, shapes against the specialization,
    devices, int32 indices, the lengths of kv_indptr (B + 1) and kv_last_page_len (B), sm_scale,
    contiguous last dimensions, strides.

    NOT checked without ``validate_data`` (the index *data*, which lives on the device): that kv_indptr
    starts at 0, never decreases and ends at most at len(kv_indices); that every page id is in
    [0, num_pages); that kv_last_page_len is in [1, page_size] for sequences with pages. Such input
    makes the kernel read outside the cache: garbage, NaN, an illegal memory access on a GPU, a
    segfault under the interpreter. ``MLADecode.plan()`` checks all of it once per layout.

    No host synchronisation unless ``validate_data``: the call can be captured in a CUDA graph.
    The config is chosen from B and the average pages per request (``kv_indices.numel() / B``), both
    known on the host without a sync; the split is balanced on the device (see the generated module).
    """
    if ops.routed(q_nope):
        return _routed(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale, kv_last_page_len,
                       out, lse, config, validate_data)
    metadata = launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len, out, lse)
    # with the types: True == 1 == 1.0 as keys, but only some of them pass validation
    key = None if metadata is None else (metadata, sm_scale, type(sm_scale), config)
    try:
        plan = _ONE_CALL.get(key)
    except TypeError:  # an unhashable argument: validation names it
        key, plan = None, None
    if plan is None:
        spec = _check_call(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len,
                           sm_scale, out, lse)
    if validate.data_validation(validate_data):
        validate.check_host_data(spec if plan is None else plan.spec, ckv_cache.shape[0], kv_indptr, kv_indices,
                                 kv_last_page_len)
    if plan is None:
        batch, device = q_nope.shape[0], q_nope.device
        if config is None:
            avg_kv = kv_indices.numel() * spec.page_size / max(1, batch)
            config = dispatch.decode_config(spec, batch, avg_kv, device)
        config.check_spec(spec)
        plan = _Plan(spec, config, batch, kv_indices.numel() * spec.page_size, float(sm_scale), device)
        if key is not None:
            _ONE_CALL.put(key, plan)
    out, lse = plan.outputs(q_nope.dtype, out, lse)
    plan.run((), _tensors(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len, out, lse,
                          plan.scratch(), plan.spec.page_size))
    return out, lse


def _routed(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
            kv_last_page_len: torch.Tensor | None, out: torch.Tensor | None, lse: torch.Tensor | None,
            config: DecodeConfig | None, validate_data: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mla_decode` through the custom ops (torch.compile, fake tensors; tuner.runtime.ops)."""
    sm_scale = validate.check_sm_scale(sm_scale)
    text = ops.config_text(config)
    if out is None and lse is None:
        return torch.ops.mla_tuner.decode(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale,
                                          kv_last_page_len, text, validate_data)
    out, lse = ops.missing_outputs(q_nope, out, lse)
    torch.ops.mla_tuner.decode_out(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, sm_scale,
                                   kv_last_page_len, out, lse, text, validate_data)
    return out, lse


def _check_call(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None,
                sm_scale: float, out: torch.Tensor | None, lse: torch.Tensor | None) -> MLASpec:
    """The one-call form's metadata checks (clear errors naming the argument); returns the spec."""
    spec = validate.spec_from_tensors("decode", q_nope, q_pe, ckv_cache, kpe_cache)
    batch, device = q_nope.shape[0], q_nope.device
    validate.check_inputs(spec, batch, q_nope, q_pe, ckv_cache, kpe_cache)
    validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device)
    validate.check_sm_scale(sm_scale)
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
    """

    def __init__(self) -> None:
        self.spec: MLASpec | None = None
        self.config: DecodeConfig | None = None
        self.max_page_id: int | None = None
        self._plan: _Plan | None = None
        self.handle = ops.register(self)  # names this plan in torch.ops.mla_tuner.decode_run

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor | None = None, *, num_heads: int, page_size: int,
             sm_scale: float, head_dim_ckv: int = 512, head_dim_kpe: int = 64,
             num_pages: int | None = None, config: DecodeConfig | None = None,
             validate_data: bool = True) -> MLADecode:
        """Check and record one batch layout (host work, one device sync).

        Args:
            kv_indptr, kv_indices, kv_last_page_len: as :func:`mla_decode`; kept for every run().
            num_heads, page_size, head_dim_ckv, head_dim_kpe: the specialization.
            sm_scale: softmax scale (a Python float).
            num_pages: the cache's page count, if known: page ids are then checked here already;
                without it run() compares the largest page id with the cache it is given.
            config: launch parameters (default: the tuned dispatch table, else the default config).
            validate_data: check the index data on the host (default; ``MLA_TUNER_VALIDATE=1`` forces
                it). False skips every data check, including run()'s page-id bound.
        """
        spec = MLASpec("decode", num_heads, head_dim_ckv, head_dim_kpe, page_size)
        batch = validate._need_tensor("kv_indptr", kv_indptr).numel() - 1
        if batch < 0:
            raise ValueError("kv_indptr: expected at least one element, found 0")
        device = kv_indptr.device
        validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device)
        sm_scale = validate.check_sm_scale(sm_scale)
        host = None
        if validate.data_validation(validate_data):
            host = validate.check_host_data(spec, num_pages, kv_indptr, kv_indices, kv_last_page_len)
        if config is None:
            kv_lens = validate.layout_kv_lengths(host, kv_indptr, page_size, kv_last_page_len)
            config = dispatch.decode_config(spec, batch, int(kv_lens.sum()) / max(1, batch), device)
        config.check_spec(spec)
        self.spec, self.config, self.sm_scale = spec, config, sm_scale
        self.max_page_id = None if host is None else host.max_page_id
        self.batch, self.device = batch, device
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = kv_indptr, kv_indices, kv_last_page_len
        self._plan = _Plan(spec, config, batch, kv_indices.numel() * page_size, sm_scale, device)
        self.scratch = self._plan.scratch()
        return self

    def check_run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                  out: torch.Tensor | None, lse: torch.Tensor | None) -> _Plan:
        """run()'s checks of tensor metadata (clear errors naming the argument); returns the plan."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("MLADecode.run: call plan() first")
        validate.check_inputs(plan.spec, self.batch, q_nope, q_pe, ckv_cache, kpe_cache)
        if q_nope.device != self.device:
            raise ValueError(f"q_nope: expected device {self.device} (the planned one), found {q_nope.device}")
        validate.check_outputs(self.batch, plan.spec, q_nope.dtype, self.device, out, lse)
        validate.check_planned_pages(self.max_page_id, ckv_cache)
        return plan

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with the planned layout; shapes as :func:`mla_decode`. No host sync.

        Checks tensor metadata only, including the planned largest page id against
        ``ckv_cache.shape[0]`` (ValueError naming kv_indices).
        """
        if ops.routed(q_nope):
            if out is None and lse is None:
                return torch.ops.mla_tuner.decode_run(self.handle, q_nope, q_pe, ckv_cache, kpe_cache)
            out, lse = ops.missing_outputs(q_nope, out, lse)
            torch.ops.mla_tuner.decode_run_out(self.handle, q_nope, q_pe, ckv_cache, kpe_cache, out, lse)
            return out, lse
        key = launch.call_key(q_nope, q_pe, ckv_cache, kpe_cache, out, lse)
        plan = self._plan
        if plan is None or plan.launches.get(key) is None:
            plan = self.check_run(q_nope, q_pe, ckv_cache, kpe_cache, out, lse)
        out, lse = plan.outputs(q_nope.dtype, out, lse)
        plan.run(key, _tensors(q_nope, q_pe, ckv_cache, kpe_cache, self.kv_indptr, self.kv_indices,
                               self.kv_last_page_len, out, lse, self.scratch, plan.spec.page_size))
        return out, lse
