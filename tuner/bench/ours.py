"""Our implementation as :class:`~tuner.bench.peers.Impl` adapters beside the peers: plan/run, the one-call
form and the untuned default config (no explicit config: the dispatch table decides).

A speculative-decoding row (``Workload.is_speculative``: s_q queries per request, causal among them) runs as
our decode with queries [B, s_q, H, *] (``MLADecode.plan(q_len=s_q)`` / ``mla_decode``), which is how an
engine calls it: the rows packed in the decode kernel where it takes them, else the causal prefill kernel
(tuner.runtime.mtp). Its inputs, outputs and reference are the causal prefill's, viewed per request.

Over an fp8 cache (``Inputs.scales``) plan/run and the one call run too: ``plan(..., kv_dtype=float8_e4m3fn)``
and the per-tensor scales to ``run`` / the one call as Python floats; the untuned default does not (its
config is derived for the 16-bit module)."""

from __future__ import annotations

import torch

from tuner.harness.inputs import Inputs, Workload
from tuner.runtime import mtp
from tuner.runtime.config import DecodeConfig, PrefillConfig
from tuner.runtime.decode import MLADecode, mla_decode
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import untuned_config
from tuner.runtime.loader import module_hash
from tuner.runtime.prefill import MLAPrefill, mla_prefill

from .peers import Impl, Prepared, all_peers, output_buffers


class OursPlanRun(Impl):
    """MLADecode / MLAPrefill: plan() once (the host work), time run(). ``default``: with the default
    config instead of the tuned dispatch (what tuning gained, in the same run)."""

    key = "ours"
    label = "mla-tuner MLADecode / MLAPrefill plan + run (tuned dispatch)"

    fp8 = True

    def __init__(self, default: bool = False) -> None:
        self.default = default
        if default:
            self.key = "ours_default"
            self.label = "mla-tuner MLADecode / MLAPrefill plan + run (default config, untuned)"
            self.eager = False  # the same host path as ``ours``: its eager time would say nothing new
            self.fp8 = False

    def _config(self, w: Workload, inp: Inputs, page_size: int) -> DecodeConfig | PrefillConfig | None:
        if not self.default:
            return None
        spec, rows = w.spec(page_size), w.total_q
        if w.is_speculative:  # the kernel that runs the 4-D decode, and its rows (requests when packed)
            spec = mtp.kernel(spec, w.queries_per_request, None)
            rows = w.batch if spec.is_decode else rows
        return untuned_config(spec, rows, w.avg_kv_len, gpu_info(inp.q_nope.device))

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        shape = dict(num_heads=w.heads, page_size=page_size, sm_scale=inp.sm_scale,
                     head_dim_ckv=w.head_dim_ckv, head_dim_kpe=w.head_dim_kpe,
                     num_pages=inp.ckv_cache.shape[0], config=self._config(w, inp, page_size))
        scales = inp.scales
        if scales:  # a 16-bit cache plans as before (kv_dtype None)
            shape["kv_dtype"] = inp.ckv_cache.dtype
        plan: MLADecode | MLAPrefill
        if inp.qo_indptr is None or w.is_speculative:
            q_len = w.queries_per_request if w.is_speculative else 1
            plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, q_len=q_len, **shape)
        else:
            plan = MLAPrefill().plan(inp.qo_indptr, inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len,
                                     causal=w.causal, **shape)
        assert plan.spec is not None and plan.config is not None
        out, lse = output_buffers(inp)
        q_nope, q_pe, ckv, kpe = inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache
        info = {"kernel": plan.spec.name(), "config": plan.config.to_dict(),
                "module_hash": module_hash(plan.spec)}
        if w.is_speculative:
            q4 = per_request(w, q_nope, q_pe, out, lse)

            def speculative() -> tuple[torch.Tensor, torch.Tensor]:
                plan.run(*q4[:2], ckv, kpe, out=q4[2], lse=q4[3], **scales)
                return out, lse  # the rows [B * s_q, H, *] that the reference check compares

            return Prepared(speculative, info)
        return Prepared(lambda: plan.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse, **scales), info)


class OursFunctional(Impl):
    """mla_decode / mla_prefill: the one-call form (its config comes from the host-known average)."""

    key = "ours_fn"
    label = "mla-tuner mla_decode / mla_prefill one call"
    fp8 = True

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        out, lse = output_buffers(inp)
        common = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache)
        scales = inp.scales
        if w.is_speculative:
            q_nope, q_pe, out4, lse4 = per_request(w, inp.q_nope, inp.q_pe, out, lse)
            args = (q_nope, q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices, inp.sm_scale,
                    inp.kv_last_page_len)

            def speculative() -> tuple[torch.Tensor, torch.Tensor]:
                mla_decode(*args, out=out4, lse=lse4, **scales)
                return out, lse

            return Prepared(speculative)
        if inp.qo_indptr is None:
            args = (*common, inp.kv_indptr, inp.kv_indices, inp.sm_scale, inp.kv_last_page_len)
            return Prepared(lambda: mla_decode(*args, out=out, lse=lse, **scales))
        args = (*common, inp.qo_indptr, inp.kv_indptr, inp.kv_indices, inp.sm_scale, inp.kv_last_page_len)
        return Prepared(lambda: mla_prefill(*args, causal=w.causal, out=out, lse=lse, **scales))


def per_request(w: Workload, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A speculative row's query and output rows [B * s_q, H, *] as [B, s_q, H, *] views."""
    s_q = w.queries_per_request
    return tuple(t.view(w.batch, s_q, *t.shape[1:]) for t in tensors)


def implementations(peer_keys: list[str]) -> dict[str, Impl]:
    """Ours (both forms) first, then the chosen peers in table order."""
    peers = all_peers()
    unknown = [k for k in peer_keys if k not in peers]
    if unknown:
        raise ValueError(f"peers: unknown {unknown}; expected some of {list(peers)}")
    impls: dict[str, Impl] = {"ours": OursPlanRun(), "ours_fn": OursFunctional(), "ours_default": OursPlanRun(True)}
    impls.update({k: p for k, p in peers.items() if k in peer_keys})
    return impls
