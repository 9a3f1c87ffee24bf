"""Vectorized float32 PyTorch reference for MLA decode and prefill over a paged cache.

Follows ``docs/contract.md`` exactly: kv_len(b) = (pages - 1) * page_size + kv_last_page_len[b]
(0 without pages), score = (q_nope . ckv + q_pe . kpe) * sm_scale, lse in base 2, a row that sees no
token gets output 0 and lse -inf. Used by the tests, the tuner's correctness gate and the benchmark.
It synchronizes with the device freely: it is never on a launch path.

An fp8 cache (float8_e4m3fn) is dequantized first: a cached element's value is ``fp8 * scale`` with the
per-tensor ``ckv_scale`` / ``kpe_scale`` (floats or one-element tensors), as the kernels read it.
"""

from __future__ import annotations

import math

import torch

from tuner.runtime.validate import kv_lengths

__all__ = ["dequantize", "kv_lengths", "mla_decode_ref", "mla_prefill_ref"]


def dequantize(cache: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """``cache`` as float32 values: an fp8 cache times its per-tensor ``scale``; a 16-bit cache as it is
    (``scale`` must then be None)."""
    if cache.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise ValueError("scale: an fp8 cache needs its per-tensor scale")
        factor = scale.float().reshape(()) if isinstance(scale, torch.Tensor) else float(scale)
        return cache.float() * factor
    if scale is not None:
        raise ValueError(f"scale: given for a {cache.dtype} cache (scales belong to fp8 caches)")
    return cache


def _attend(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
            visible: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, H, *], kv [T, *], visible bool [R, T] -> output float32 [R, H, ckv], lse [R, H] (base 2)."""
    scores = (torch.einsum("rhc,tc->rht", q_nope.float(), ckv.float())
              + torch.einsum("rhk,tk->rht", q_pe.float(), kpe.float())) * sm_scale
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # natural log; -inf where nothing is visible
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0))
    probs = probs.masked_fill(~visible[:, None, :], 0.0)
    out = torch.einsum("rht,tc->rhc", probs, ckv.float())
    return out, lse / math.log(2.0)


def mla_prefill_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                    kpe_cache: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                    kv_indices: torch.Tensor, sm_scale: float,
                    kv_last_page_len: torch.Tensor | None = None,
                    causal: bool = True, ckv_scale: float | torch.Tensor | None = None,
                    kpe_scale: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefill. q_nope [total_q, H, ckv], q_pe [total_q, H, kpe]; returns float32
    output [total_q, H, ckv] and lse [total_q, H] (base 2).

    Query i of sequence b sits at position kv_len(b) - q_len(b) + i and, when causal, sees the tokens
    at positions 0 .. that position; otherwise all kv_len(b) tokens. Vectorized within a sequence,
    in chunks of query rows so that the score matrix stays bounded. ``ckv_scale``/``kpe_scale``: the
    scales of an fp8 cache (:func:`dequantize`).
    """
    page_size = ckv_cache.shape[1]
    kv_len = kv_lengths(kv_indptr, page_size, kv_last_page_len).tolist()
    qo = qo_indptr.long().tolist()
    kv_ptr = kv_indptr.long().tolist()
    total_q, heads = q_nope.shape[0], q_nope.shape[1]
    out = torch.zeros(total_q, heads, ckv_cache.shape[2], dtype=torch.float32, device=q_nope.device)
    lse = torch.full((total_q, heads), float("-inf"), dtype=torch.float32, device=q_nope.device)
    for b, n_kv in enumerate(kv_len):
        q0, q1 = qo[b], qo[b + 1]
        if q1 == q0:
            continue
        pos = torch.arange(n_kv, device=q_nope.device)
        page = kv_indices.long()[kv_ptr[b] + pos // page_size]
        ckv = dequantize(ckv_cache[page, pos % page_size], ckv_scale).float()  # only this sequence's tokens
        kpe = dequantize(kpe_cache[page, pos % page_size], kpe_scale).float()
        chunk = max(1, (1 << 26) // max(1, heads * n_kv))
        for r0 in range(q0, q1, chunk):
            r1 = min(q1, r0 + chunk)
            q_pos = n_kv - (q1 - q0) + torch.arange(r0 - q0, r1 - q0, device=q_nope.device)
            visible = torch.ones(r1 - r0, n_kv, dtype=torch.bool, device=q_nope.device)
            if causal:
                visible = pos[None, :] <= q_pos[:, None]
            out[r0:r1], lse[r0:r1] = _attend(q_nope[r0:r1], q_pe[r0:r1], ckv, kpe, visible, sm_scale)
    return out, lse


def mla_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                   kpe_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                   sm_scale: float, kv_last_page_len: torch.Tensor | None = None, *,
                   ckv_scale: float | torch.Tensor | None = None, kpe_scale: float | torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decode: one query per sequence that sees all its tokens.

    q_nope [B, H, ckv], q_pe [B, H, kpe]; returns float32 output [B, H, ckv] and lse [B, H] (base 2).
    """
    batch = q_nope.shape[0]
    qo_indptr = torch.arange(batch + 1, device=q_nope.device, dtype=torch.int32)
    return mla_prefill_ref(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices,
                           sm_scale, kv_last_page_len, causal=False, ckv_scale=ckv_scale, kpe_scale=kpe_scale)
