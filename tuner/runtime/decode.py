"""Runtime API for decode: the one-call :func:`mla_decode` and the plan/run :class:`MLADecode`."""

from __future__ import annotations

import torch

from . import dispatch, validate
from .config import DecodeConfig
from .device import gpu_info
from .loader import load_module
from .spec import MLASpec

_HOST_ONLY = ("programs_per_sm", "split_tokens", "align")  # config fields the runtime turns into num_programs


class _Split:
    """The split of one batch layout: the number of shares and their scratch (float32)."""

    def __init__(self, spec: MLASpec, config: DecodeConfig, batch: int, max_tokens: int,
                 device: torch.device) -> None:
        self.num_programs = config.num_programs(spec, gpu_info(device).num_sms, max_tokens, batch)
        rows = load_module(spec).scratch_rows(batch, self.num_programs)
        self.partial_out = torch.empty(rows * spec.head_dim_ckv, dtype=torch.float32, device=device)
        self.partial_lse = torch.empty(rows, dtype=torch.float32, device=device)


def _launch(spec: MLASpec, config: DecodeConfig, q_nope: torch.Tensor, q_pe: torch.Tensor,
            ckv_cache: torch.Tensor, kpe_cache: torch.Tensor, kv_indptr: torch.Tensor,
            kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor | None, sm_scale: float,
            out: torch.Tensor | None, lse: torch.Tensor | None,
            split: _Split) -> tuple[torch.Tensor, torch.Tensor]:
    batch = q_nope.shape[0]
    if out is None:
        out = torch.empty(batch, spec.num_heads, spec.head_dim_ckv, dtype=q_nope.dtype, device=q_nope.device)
    if lse is None:
        lse = torch.empty(batch, spec.num_heads, dtype=torch.float32, device=q_nope.device)
    load_module(spec).launch(
        q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices,
        kv_last_page_len if spec.page_size > 1 else None, sm_scale, out, lse,
        split.partial_out, split.partial_lse, split.num_programs,
        **{k: v for k, v in config.to_dict().items() if k not in _HOST_ONLY},
    )
    return out, lse


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
    spec = validate.spec_from_tensors("decode", q_nope, q_pe, ckv_cache, kpe_cache)
    batch, device = q_nope.shape[0], q_nope.device
    validate.check_inputs(spec, batch, q_nope, q_pe, ckv_cache, kpe_cache)
    validate.check_indices(batch, kv_indptr, kv_indices, kv_last_page_len, device)
    scale = validate.check_sm_scale(sm_scale)
    validate.check_outputs(batch, spec, q_nope.dtype, device, out, lse)
    if validate.data_validation(validate_data):
        validate.check_host_data(spec, ckv_cache.shape[0], kv_indptr, kv_indices, kv_last_page_len)
    if config is None:
        avg_kv = kv_indices.numel() * spec.page_size / max(1, batch)
        config = dispatch.decode_config(spec, batch, avg_kv, device)
    config.check_spec(spec)
    return _launch(spec, config, q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices,
                   kv_last_page_len, scale, out, lse,
                   _Split(spec, config, batch, kv_indices.numel() * spec.page_size, device))


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
        self.split = _Split(spec, config, batch, kv_indices.numel() * page_size, device)
        return self

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
            kpe_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with the planned layout; shapes as :func:`mla_decode`. No host sync.

        Checks tensor metadata only, including the planned largest page id against
        ``ckv_cache.shape[0]`` (ValueError naming kv_indices).
        """
        if self.spec is None or self.config is None:
            raise RuntimeError("MLADecode.run: call plan() first")
        validate.check_inputs(self.spec, self.batch, q_nope, q_pe, ckv_cache, kpe_cache)
        if q_nope.device != self.device:
            raise ValueError(f"q_nope: expected device {self.device} (the planned one), found {q_nope.device}")
        validate.check_outputs(self.batch, self.spec, q_nope.dtype, self.device, out, lse)
        validate.check_planned_pages(self.max_page_id, ckv_cache)
        return _launch(self.spec, self.config, q_nope, q_pe, ckv_cache, kpe_cache, self.kv_indptr,
                       self.kv_indices, self.kv_last_page_len, self.sm_scale, out, lse, self.split)
