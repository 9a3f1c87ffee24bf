"""Adapters that run the other implementations on the benchmark's inputs (``mla-tune bench``).

Every adapter turns one :class:`tuner.harness.inputs.Inputs` into a :class:`Prepared` call: the host work
(planning, index conversion, layout changes a peer's engine would already have) is done once, outside
the timed region, and the call only launches work and returns ``(output, lse or None)`` with the
output [total_q, H, ckv] in the input dtype and lse [total_q, H] float32 in base 2. Over an fp8 cache
(``Inputs.scales``) an adapter passes the per-tensor scales its library takes; one that has no fp8 path
(``Impl.fp8`` false) does not run those rows.

The peers, called the way their own engines call them (``docs/peers.md``):

- ``fa3`` / ``fa2``: FlashInfer's ``BatchMLAPagedAttentionWrapper`` with that backend, planned once (fa3
  also over an fp8 cache: ``kv_data_type`` float8_e4m3fn, the scales as floats to ``run``)
  (:mod:`tuner.bench.flashinfer_mla`).
- ``flashmla``: FlashMLA's dense decode kernel (``flash_mla_with_kvcache``, its "legacy" SM90 side), page
  size 64, decode and speculative-decoding rows; one [pages, 64, 1, ckv + kpe] cache and a block table
  (:mod:`tuner.bench.flashmla`); over an fp8 cache it quantizes the queries too.
- ``sglang``: SGLang's Triton MLA decode kernel ``decode_attention_fwd`` (decode rows only); it reads a
  combined [slots, 1, ckv + kpe] cache by token slot and returns no lse.
- ``torch``: a plain PyTorch implementation (gather, batched matmuls, float32 softmax): the floor of
  effort, and the only peer that runs without CUDA (over an fp8 cache it dequantizes what it gathers).

The project never depends on the peers: FlashInfer, FlashMLA and SGLang are imported inside the adapters
only, and an adapter that cannot import its library says why (:meth:`Impl.unavailable`) instead of
failing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.harness.inputs import Inputs, Workload
from tuner.harness.reference import kv_lengths

LOG2E = 1.0 / math.log(2.0)
SGLANG_MODULE = "decode_attention"  # SGLang's triton_ops/decode_attention.py, staged as docs/peers.md says
SGLANG_MAX_KV_SPLITS = 8  # SGLang's default (--triton-attention-num-kv-splits)
PEER_KEYS = ("fa3", "fa2", "flashmla", "sglang", "torch")

Call = Callable[[], "tuple[torch.Tensor, torch.Tensor | None]"]
Convert = Callable[[torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class Prepared:
    """A planned call and what is worth recording about the plan (chosen config, splits, ...).

    ``convert``: for a peer whose call returns its own layout, what turns the call's result into
    (output [total_q, H, ckv], lse [total_q, H] base 2 or None) for the check; never timed.
    """

    call: Call
    info: dict[str, object] = field(default_factory=dict)
    convert: Convert | None = None

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One call, its result in the bench's layout (for the check)."""
        out, lse = self.call()
        return self.convert(out, lse) if self.convert is not None else (out, lse)


class NotApplicable(Exception):
    """Raised by :meth:`Impl.prepare` when the inputs themselves rule the implementation out (what
    :meth:`Impl.not_applicable` cannot see from the workload): the row records it as ``n/a``."""


class Impl:
    """One implementation in the benchmark: a short key (table column, JSON key), a label, and
    ``prepare(workload, inputs, page_size) -> Prepared``."""

    key: str = ""
    label: str = ""
    returns_lse: bool = True
    library: str | None = None  # the package whose version the results record
    eager: bool = True  # also time it eagerly (tuner.harness.timing.time_eager) where the bench does
    fp8: bool = False  # runs over an fp8 (float8_e4m3fn) cache with per-tensor scales (``--kv-dtype fp8``)

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this implementation cannot run here at all (None: it can)."""
        return None

    def not_applicable(self, w: Workload, page_size: int) -> str | None:
        """Why this implementation does not run this row (None: it does)."""
        return None

    def inexact(self, inp: Inputs) -> str | None:
        """Why its result may miss the tolerance by design on these inputs (None: it must not). The bench
        still times such an implementation when its output only misses the tolerance (status
        ``inexact``, the error reported), not when it is malformed (NaN, -inf in the wrong place)."""
        return None

    def version(self) -> str | None:
        return None

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        raise NotImplementedError


def import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure to import means "not available", with the reason
        return f"not importable: {type(err).__name__}: {err}"
    return None


def token_slots(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_lens: torch.Tensor,
                page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level view of a paged layout.

    Args:
        kv_indptr: int32 [B + 1] page offsets; kv_indices: int32 page ids; kv_lens: [B] tokens per
            sequence (:func:`tuner.harness.reference.kv_lengths`).

    Returns:
        (slot_indptr int32 [B + 1], slots int64 [total tokens]): the tokens of sequence b are
        ``slots[slot_indptr[b]:slot_indptr[b + 1]]``, in order, where slot = page * page_size + offset
        is the row of the cache seen as [num_pages * page_size, D]. Unused slots of partial last pages
        never appear. Synchronizes with the device (setup only).
    """
    device = kv_indptr.device
    lens = kv_lens.to(device=device, dtype=torch.int64)
    batch = lens.numel()
    slot_indptr = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    slot_indptr[1:] = torch.cumsum(lens, 0)
    total = int(slot_indptr[-1])
    seq = torch.repeat_interleave(torch.arange(batch, device=device), lens, output_size=total)
    pos = torch.arange(total, device=device) - slot_indptr[seq]
    page = kv_indices.long()[kv_indptr.long()[seq] + pos // page_size]
    return slot_indptr.to(torch.int32), page * page_size + pos % page_size


def kv_lens_of(inp: Inputs, page_size: int) -> torch.Tensor:
    return kv_lengths(inp.kv_indptr, page_size, inp.kv_last_page_len)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_pages, page_size, D] -> [num_pages * page_size, D] (a view when the cache is contiguous)."""
    return cache.reshape(-1, cache.shape[-1])


def fused_cache(inp: Inputs) -> torch.Tensor:
    """The one [num_pages, page_size, ckv + kpe] cache: the inputs' own in the fused layout (the memory
    that every implementation reads), otherwise a copy concatenated from the two caches (setup only)."""
    if inp.kv_cache is not None:
        return inp.kv_cache
    return torch.cat([inp.ckv_cache, inp.kpe_cache], dim=-1)


def cache_note(inp: Inputs) -> str:
    return "the inputs' fused cache" if inp.kv_cache is not None else "own copy of the two caches, concatenated"


# ---------------------------------------------------------------------------------------------------
# SGLang
# ---------------------------------------------------------------------------------------------------

def sglang_kv_splits(kv_lens: list[int], num_heads: int, num_sms: int,
                     max_kv_splits: int = SGLANG_MAX_KV_SPLITS) -> list[int]:
    """KV splits per sequence for SGLang's decode kernel, chosen by the rule that SGLang's Triton
    attention backend applies before each decode step (its ``get_num_kv_splits``, which lives in the
    backend rather than in the kernel module, so it is restated here):

    - balance: cut the longest sequence into about longest / shortest chunks (lengths within 25% of
      each other count as equal: one chunk);
    - fill: aim for ``num_sms * max(1, log2(longest / 64))`` programs over the kernel's grid of
      batch x ceil(heads / 16) head groups;

    each capped at ``max_kv_splits``. Every sequence gets the larger of its chunk counts at the two chunk
    sizes (the longest sequence divided by each count), and at least 1.
    """
    if not kv_lens:
        return []
    longest = max(1, max(kv_lens))
    shortest = max(1, min(kv_lens))
    if longest * 8 < shortest * 10:
        shortest = longest
    balance_chunk = -(-longest // min(-(-longest // shortest), max_kv_splits))
    target_programs = int(num_sms * max(math.log2(longest / 64.0), 1.0))
    grid = len(kv_lens) * -(-num_heads // min(16, num_heads))
    fill_chunk = -(-longest // max(1, min(-(-target_programs // grid), max_kv_splits)))
    return [max(1, -(-n // balance_chunk), -(-n // fill_chunk)) for n in kv_lens]


class SGLangPeer(Impl):
    """SGLang's Triton MLA decode kernel (``decode_attention_fwd``), decode rows only.

    Its engine keeps one [slots, 1, ckv + kpe] buffer and token-slot indices; :meth:`prepare` views the
    inputs' fused cache as that buffer, or builds it from split caches once (slot = page * page_size +
    offset, so every page size runs), the query as cat(q_nope, q_pe) [B, H, ckv + kpe], and the stage-1
    scratch. It returns no lse.
    """

    key = "sglang"
    label = "SGLang Triton decode_attention_fwd"
    returns_lse = False
    library = "sglang"

    def __init__(self, max_kv_splits: int = SGLANG_MAX_KV_SPLITS) -> None:
        self.max_kv_splits = max_kv_splits

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA (or the Triton interpreter)"
        return import_error(SGLANG_MODULE)

    def not_applicable(self, w: Workload, page_size: int) -> str | None:
        return None if w.is_decode else "decode kernel only"

    def version(self) -> str | None:
        try:
            return importlib.metadata.version("sglang")
        except importlib.metadata.PackageNotFoundError:
            pass
        try:
            source = Path(importlib.import_module(SGLANG_MODULE).__file__ or "").read_bytes()
        except Exception:  # noqa: BLE001
            return None
        return f"unknown (decode_attention.py sha256 {hashlib.sha256(source).hexdigest()[:12]})"

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        from tuner.runtime.device import gpu_info

        fwd = importlib.import_module(SGLANG_MODULE).decode_attention_fwd
        batch, heads, ckv = inp.q_nope.shape
        device = inp.q_nope.device
        kv_lens = kv_lens_of(inp, page_size)
        slot_indptr, slots = token_slots(inp.kv_indptr, inp.kv_indices, kv_lens, page_size)
        splits = sglang_kv_splits(kv_lens.tolist(), heads, gpu_info(device).num_sms, self.max_kv_splits)
        num_kv_splits = torch.tensor(splits, dtype=torch.int32, device=device)
        q = torch.cat([inp.q_nope, inp.q_pe], dim=-1).contiguous()
        k_buffer = fused_cache(inp).reshape(-1, 1, q.shape[-1])
        v_buffer = k_buffer[..., :ckv]
        attn_logits = torch.empty(batch, heads, self.max_kv_splits, ckv, dtype=torch.float32, device=device)
        attn_lse = torch.empty(batch, heads, self.max_kv_splits, dtype=torch.float32, device=device)
        out = output_buffers(inp)[0]
        scale, max_splits = inp.sm_scale, self.max_kv_splits

        def call() -> tuple[torch.Tensor, torch.Tensor | None]:
            fwd(q, k_buffer, v_buffer, out, slot_indptr, slots, attn_logits, attn_lse, num_kv_splits,
                max_splits, scale, k_scale=1.0, v_scale=1.0)
            return out, None

        splits_range = [min(splits, default=0), max(splits, default=0)]
        return Prepared(call, {"max_kv_splits": max_splits, "num_kv_splits": splits_range,
                               "cache": cache_note(inp)})


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch
# ---------------------------------------------------------------------------------------------------

def _softmax_pv(scores: torch.Tensor, hidden: torch.Tensor | None,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores float32 [..., R, T], hidden bool broadcastable to it (True: masked), values float32
    [..., T, D] -> (output float32 [..., R, D], lse float32 [..., R] in base 2); a row that sees no
    token gets output 0 and lse -inf."""
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - shift[..., None])
    return torch.matmul(probs, values), lse * LOG2E


class TorchPeer(Impl):
    """Plain PyTorch: gather the tokens, batched matmuls in float32, float32 softmax.

    Decode: one padded batch ([B, longest, D] gathers, three bmm: q_nope.ckv^T + q_pe.kpe^T, then P.ckv).
    Prefill: per sequence, batched over heads, with a causal mask built at prepare time. The matmuls
    run in float32 (bf16 score matmuls miss the 1e-3 lse bar by about 2x at 4k tokens).
    """

    key = "torch"
    label = "PyTorch (gather, batched matmuls, fp32 softmax)"
    fp8 = True  # an fp8 cache is dequantized as it is gathered (fp8 * scale, in float32)

    def prepare(self, w: Workload, inp: Inputs, page_size: int) -> Prepared:
        kv_lens = kv_lens_of(inp, page_size)
        slot_indptr, slots = token_slots(inp.kv_indptr, inp.kv_indices, kv_lens, page_size)
        caches = _flat(inp.ckv_cache), _flat(inp.kpe_cache)
        if inp.qo_indptr is None:
            return Prepared(_torch_decode(inp, caches, kv_lens, slot_indptr, slots))
        return Prepared(_torch_prefill(inp, caches, slot_indptr, slots, w.causal))


def output_buffers(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [total_q, H, ckv] in the input dtype, lse [total_q, H] float32), filled as a row without
    queries or tokens leaves them: 0 and -inf."""
    out = torch.zeros_like(inp.q_nope)
    lse = torch.full(inp.q_nope.shape[:2], float("-inf"), dtype=torch.float32, device=inp.q_nope.device)
    return out, lse


def _gather(cache: torch.Tensor, idx: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``cache[idx]`` in float32, dequantized (times ``scale``) when the cache is fp8."""
    x = cache[idx].float()
    return x if scale is None else x * scale


def _torch_decode(inp: Inputs, caches: tuple[torch.Tensor, torch.Tensor], kv_lens: torch.Tensor,
                  slot_indptr: torch.Tensor, slots: torch.Tensor) -> Call:
    """Padded batch: [B, longest] token slots (padding repeats a real token and is masked)."""
    device = inp.q_nope.device
    lens = kv_lens.to(device)
    longest = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(longest, device=device)
    valid = pos[None, :] < lens[:, None]  # [B, longest]
    if slots.numel():
        flat = (slot_indptr[:-1].long()[:, None] + pos[None, :]).clamp(max=slots.numel() - 1)
        idx = torch.where(valid, slots[flat], slots[0])  # padding reads a real token, then is masked
    else:
        idx = torch.zeros(lens.numel(), 0, dtype=torch.long, device=device)
    hidden = ~valid[:, None, :]  # [B, 1, longest]
    ckv, kpe = caches
    q_nope, q_pe, scale, ckv_scale, kpe_scale = inp.q_nope, inp.q_pe, inp.sm_scale, inp.ckv_scale, inp.kpe_scale
    out, lse = output_buffers(inp)

    def call() -> tuple[torch.Tensor, torch.Tensor | None]:
        k = _gather(ckv, idx, ckv_scale)  # [B, longest, ckv]
        kp = _gather(kpe, idx, kpe_scale)  # [B, longest, kpe]
        scores = (torch.bmm(q_nope.float(), k.transpose(1, 2)) + torch.bmm(q_pe.float(), kp.transpose(1, 2)))
        o, l2 = _softmax_pv(scores * scale, hidden, k)
        out.copy_(o)
        lse.copy_(l2)
        return out, lse

    return call


def _torch_prefill(inp: Inputs, caches: tuple[torch.Tensor, torch.Tensor], slot_indptr: torch.Tensor,
                   slots: torch.Tensor, causal: bool) -> Call:
    """Per sequence with queries, batched over heads; causal masks built here, outside the call."""
    assert inp.qo_indptr is not None
    device = inp.q_nope.device
    qo, sp = inp.qo_indptr.tolist(), slot_indptr.tolist()
    plan: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
    for b in range(len(qo) - 1):
        q0, q1, s0, s1 = qo[b], qo[b + 1], sp[b], sp[b + 1]
        if q1 == q0:
            continue
        n, q = s1 - s0, q1 - q0
        hidden = None
        if causal:  # query i sits at position n - q + i and sees tokens 0 .. that position
            position = n - q + torch.arange(q, device=device)
            hidden = torch.arange(n, device=device)[None, :] > position[:, None]
        plan.append((q0, q1, slots[s0:s1], hidden))
    ckv, kpe = caches
    q_nope, q_pe, scale, ckv_scale, kpe_scale = inp.q_nope, inp.q_pe, inp.sm_scale, inp.ckv_scale, inp.kpe_scale
    out, lse = output_buffers(inp)

    def call() -> tuple[torch.Tensor, torch.Tensor | None]:
        for q0, q1, seq_slots, hidden in plan:
            k = _gather(ckv, seq_slots, ckv_scale)  # [n, ckv]
            kp = _gather(kpe, seq_slots, kpe_scale)  # [n, kpe]
            qn = q_nope[q0:q1].float().transpose(0, 1)  # [H, q, ckv]
            qp = q_pe[q0:q1].float().transpose(0, 1)  # [H, q, kpe]
            o, l2 = _softmax_pv((qn @ k.T + qp @ kp.T) * scale, hidden, k)  # [H, q, ckv], [H, q]
            out[q0:q1] = o.transpose(0, 1)
            lse[q0:q1] = l2.transpose(0, 1)
        return out, lse

    return call


def all_peers(max_kv_splits: int = SGLANG_MAX_KV_SPLITS) -> dict[str, Impl]:
    """Every peer adapter, by key, in table order."""
    from .flashinfer_mla import FlashInferPeer  # their modules build on this one
    from .flashmla import FlashMLAPeer

    peers: list[Impl] = [FlashInferPeer("fa3"), FlashInferPeer("fa2"), FlashMLAPeer(), SGLangPeer(max_kv_splits),
                         TorchPeer()]
    return {p.key: p for p in peers}
