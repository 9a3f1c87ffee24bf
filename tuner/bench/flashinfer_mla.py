"""FlashInfer's MLA wrapper as a peer of ``mla-tune bench`` (``docs/peers.md``): ``BatchMLAPagedAttentionWrapper``
with one backend (fa3, fa2), planned once per row, over a 16-bit cache and (fa3) an fp8 one. ``flashinfer`` is
imported inside the adapter only.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from tuner.harness.inputs import Inputs, Workload

from .peers import Impl, Prepared, import_error, kv_lens_of, output_buffers

FLASHINFER_WORKSPACE_BYTES = 256 << 20  # what FlashInfer's own examples and SGLang allocate


class FlashInferPeer(Impl):
    """FlashInfer's ``BatchMLAPagedAttentionWrapper`` with one backend (``fa3`` or ``fa2``).

    plan() (which copies the index arrays to the host) runs once per row in :meth:`prepare`; the timed
    call is run() with split query and cache, base-2 lse, into preallocated out/lse. Decode rows are
    planned with qo_indptr = arange(B + 1) and causal=False (one query that sees every token, as
    SGLang's FlashInfer MLA backend plans decode); prefill rows with their qo_indptr and causal flag.
    """

    library = "flashinfer"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.key = backend
        self.label = f"FlashInfer BatchMLAPagedAttentionWrapper ({backend})"
        self.fp8 = backend == "fa3"  # the fp8 cache path measured (docs/peers.md)
        self._workspace: torch.Tensor | None = None

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return "needs CUDA"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"needs bf16 or fp16 inputs, not {dtype}"
        return import_error("flashinfer.mla")

    def version(self) -> str | None:
        try:
            return str(importlib.import_module("flashinfer").__version__)
        except Exception:  # noqa: BLE001
            return None

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        device = inp.q_nope.device
        if self._workspace is None or self._workspace.device != device:
            self._workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        total_q, heads, ckv = inp.q_nope.shape
        qo_indptr = inp.qo_indptr
        if qo_indptr is None:
            qo_indptr = torch.arange(total_q + 1, dtype=torch.int32, device=device)
        kv_len = kv_lens_of(inp, page_size).to(torch.int32)
        causal = inp.qo_indptr is not None and w.causal
        wrapper = BatchMLAPagedAttentionWrapper(self._workspace, backend=self.backend)
        shape = dict(num_heads=heads, head_dim_ckv=ckv, head_dim_kpe=inp.q_pe.shape[2], page_size=page_size,
                     causal=causal, sm_scale=inp.sm_scale, q_data_type=inp.q_nope.dtype,
                     kv_data_type=inp.ckv_cache.dtype)
        # fp8 cache: the per-tensor scales go to run() as floats; releases that plan the run's scale
        # arguments ahead (a ``scale_mode`` in plan) are told so
        scales = inp.scales
        planned = {"scale_mode": "kv-per-tensor"} if scales and "scale_mode" in _parameters(wrapper.plan) else {}
        try:
            from flashinfer.mla import MLAPlanMetadata
        except ImportError:  # releases before the metadata object: the flat CSR form
            wrapper.plan(qo_indptr, inp.kv_indptr, inp.kv_indices, kv_len, *shape.values(), **planned)
        else:
            wrapper.plan(metadata=MLAPlanMetadata.csr(qo_indptr, inp.kv_indptr, inp.kv_indices, kv_len),
                         query_layout="split", kv_cache_layout="split", lse_mode="base2", **shape, **planned)
        out, lse = output_buffers(inp)
        q_nope, q_pe, ckv_cache, kpe_cache = inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache
        if "query" in _parameters(wrapper.run):  # 0.7: structural inputs, no warning

            def call() -> tuple[torch.Tensor, torch.Tensor | None]:
                return wrapper.run(query=(q_nope, q_pe), kv_cache=(ckv_cache, kpe_cache), out=out, lse=lse,
                                   return_lse=True, **scales)
        else:

            def call() -> tuple[torch.Tensor, torch.Tensor | None]:
                return wrapper.run(q_nope, q_pe, ckv_cache, kpe_cache, out=out, lse=lse, return_lse=True, **scales)

        info: dict[str, object] = {"backend": self.backend, "causal": causal}
        if scales:
            info.update(kv_data_type=str(inp.ckv_cache.dtype).removeprefix("torch."), **planned)
        return Prepared(call, info)


def _parameters(fn: Callable[..., object]) -> set[str]:
    """The names ``fn`` takes (empty when its signature cannot be read)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
