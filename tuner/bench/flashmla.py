"""FlashMLA as a peer of ``mla-tune bench`` (``docs/peers.md``): DeepSeek's dense MLA decode kernels for
Hopper from sgl-flash-mla, called through their "legacy" side, at page size 64, on decode and
speculative-decoding rows. ``flash_mla`` is imported inside the adapter only; the pure-PyTorch layout
conversions (block table, queries, results) are functions of their own, testable without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import torch

from tuner.harness.inputs import Inputs, Workload, fp8_scale, quantize_fp8

from .peers import LOG2E, Impl, NotApplicable, Prepared, cache_note, fused_cache, import_error, kv_lens_of

FLASHMLA_MODULE = "flash_mla"  # sgl-flash-mla's package
FLASHMLA_PAGE_SIZE = 64  # the only page size of FlashMLA's dense kernels


def block_table(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """The CSR page table as FlashMLA's ``block_table``: int32 [B, max pages per sequence], row b
    holding the pages of sequence b in order, padded with ``pad`` (a valid page id: the kernel reads no
    page past a sequence's length). Synchronizes with the device (setup only)."""
    device = kv_indptr.device
    indptr = kv_indptr.long()
    counts = indptr[1:] - indptr[:-1]
    batch = counts.numel()
    width = int(counts.max()) if batch else 0
    if width == 0 or kv_indices.numel() == 0:
        return torch.full((batch, width), pad, dtype=torch.int32, device=device)
    col = torch.arange(width, device=device)
    flat = (indptr[:-1, None] + col[None, :]).clamp(max=kv_indices.numel() - 1)
    table = torch.where(col[None, :] < counts[:, None], kv_indices.long()[flat], torch.full_like(flat, pad))
    return table.to(torch.int32).contiguous()


def flashmla_queries(q_nope: torch.Tensor, q_pe: torch.Tensor, batch: int) -> torch.Tensor:
    """[B * s_q, H, ckv] and [.., H, kpe] (row b * s_q + j: query j of request b) -> FlashMLA's
    q = cat(q_nope, q_pe) [B, s_q, H, ckv + kpe], contiguous."""
    q = torch.cat([q_nope, q_pe], dim=-1)
    return q.reshape(batch, q.shape[0] // max(1, batch), q.shape[1], q.shape[2]).contiguous()


def flashmla_to_bench(out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlashMLA's (out [B, s_q, H, ckv], lse [B, H, s_q] natural log) -> the bench's (out [B * s_q, H,
    ckv], lse [B * s_q, H] base 2), row b * s_q + j."""
    batch, s_q, heads, ckv = out.shape
    rows = out.reshape(batch * s_q, heads, ckv)
    if lse is None:
        return rows, None
    return rows, lse.transpose(1, 2).reshape(batch * s_q, heads) * LOG2E


class FlashMLAPeer(Impl):
    """FlashMLA's dense MLA decode (sgl-flash-mla: DeepSeek's Hopper kernels, "legacy" side), page size
    64, decode rows and speculative-decoding rows (s_q queries per request, ``causal=s_q > 1``).

    :meth:`prepare` (untimed) takes the one [num_pages, 64, 1, ckv + kpe] cache: the inputs' fused
    cache when the bench built one (then FlashMLA reads the very memory that ours and FlashInfer read
    through its two column views), otherwise a concatenated copy; it builds the block table, the KV
    lengths, q = cat(q_nope, q_pe) [B, s_q, H, ckv + kpe] and an empty scheduler metadata object, which
    the first call (the check, before any timing) fills and later calls reuse. The timed call is
    ``flash_mla_with_kvcache`` alone; its out [B, s_q, H, ckv] and natural-log lse [B, H, s_q] are
    converted to the bench's layout for the check only (:func:`flashmla_to_bench`).

    Over an fp8 cache (``is_fp8_kvcache=True``) FlashMLA takes fp8 queries as well: :meth:`prepare`
    quantizes q with its own per-tensor scale (amax / 448) and passes ``descale_q`` and the cache's one
    scale as ``descale_k`` (one-element float32 tensors), and fills the scheduler metadata first
    (``get_mla_decoding_metadata(..., is_fp8_kvcache=True)``). The quantized queries cost accuracy, so
    its result may miss the tolerance (:meth:`inexact`). An fp8 cache needs one scale for ckv and kpe:
    the fused layout (split caches with two scales are ``n/a``).
    """

    key = "flashmla"
    label = "FlashMLA flash_mla_with_kvcache (dense, legacy SM90 kernels)"
    library = FLASHMLA_MODULE
    fp8 = True

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "needs CUDA"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"needs bf16 or fp16 inputs, not {dtype}"
        return import_error(FLASHMLA_MODULE)

    def not_applicable(self, w: Workload, page_size: int) -> str | None:
        if page_size != FLASHMLA_PAGE_SIZE:
            return f"page size {FLASHMLA_PAGE_SIZE} only"
        if (w.head_dim_ckv, w.head_dim_kpe) != (512, 64):
            return "head dims 512 + 64 only"
        if not (w.is_decode or w.is_speculative):
            return "decode and speculative-decoding rows only"
        return None

    def inexact(self, inp: Inputs) -> str | None:
        return "fp8 cache: FlashMLA quantizes the queries to fp8 too" if inp.scales else None

    def version(self) -> str | None:
        """The imported module's ``__version__`` (what ``.peers/activate.sh`` unpacks has no dist-info),
        otherwise the installed sgl-flash-mla distribution's."""
        try:
            return str(importlib.import_module(FLASHMLA_MODULE).__version__)
        except Exception:  # noqa: BLE001
            pass
        try:
            return importlib.metadata.version("sgl-flash-mla")
        except importlib.metadata.PackageNotFoundError:
            return None

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        flash_mla = importlib.import_module(FLASHMLA_MODULE)
        s_q = w.queries_per_request
        assert s_q is not None and page_size == FLASHMLA_PAGE_SIZE
        ckv = inp.ckv_cache.shape[-1]
        kv = fused_cache(inp)
        kv = kv.reshape(kv.shape[0], page_size, 1, kv.shape[-1])
        table = block_table(inp.kv_indptr, inp.kv_indices)
        seqlens = kv_lens_of(inp, page_size).to(device=kv.device, dtype=torch.int32)
        q = flashmla_queries(inp.q_nope, inp.q_pe, w.batch)
        meta = flash_mla.get_mla_metadata()[0]
        fwd, scale, causal = flash_mla.flash_mla_with_kvcache, inp.sm_scale, s_q > 1
        info: dict[str, object] = {"s_q": s_q, "causal": causal, "cache": cache_note(inp)}
        fp8: dict[str, object] = {}
        if inp.scales:
            if inp.ckv_scale != inp.kpe_scale:
                raise NotApplicable("fp8: one scale for ckv and kpe (the fused cache layout) only")
            q_scale = fp8_scale(q)
            q = quantize_fp8(q, q_scale)
            meta.tile_scheduler_metadata, meta.num_splits = flash_mla.get_mla_decoding_metadata(
                seqlens, s_q * q.shape[2], 1, is_fp8_kvcache=True, use_legacy=True)
            fp8 = {"is_fp8_kvcache": True, "descale_q": _scalar(q_scale, kv.device),
                   "descale_k": _scalar(inp.ckv_scale, kv.device)}
            info.update(q_scale=q_scale, kv_scale=inp.ckv_scale)

        def call() -> tuple[torch.Tensor, torch.Tensor | None]:
            return fwd(q, kv, table, seqlens, ckv, meta, softmax_scale=scale, causal=causal, use_legacy=True,
                       **fp8)

        return Prepared(call, info, convert=flashmla_to_bench)


def _scalar(value: float | None, device: torch.device) -> torch.Tensor:
    """FlashMLA's descale argument: a one-element float32 tensor on the cache's device."""
    assert value is not None
    return torch.tensor([value], dtype=torch.float32, device=device)
