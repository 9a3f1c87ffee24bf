"""FlashInfer-Bench definitions of mla-tuner's specializations, written by mla-tuner.

A definition (FlashInfer-Bench's ``Definition``) names an operation, its axes (constant or variable
dimensions), its inputs in call order, its outputs, and a Python reference ``run`` that the harness scores
solutions against. FlashInfer-Bench publishes six ``mla_paged`` ones (:data:`FIB_PUBLIC`); for every other
catalogue spec :func:`definition` writes one with the same structure and naming scheme, in mla-tuner's own
words and with its own float32 reference (``docs/contract.md``). For the six public names the axes,
inputs and outputs it generates equal FlashInfer-Bench's (:func:`differences` checks that; the test holds
it against the vendored copies in ``tests/data/fib/``).
"""

from __future__ import annotations

from typing import Any

from tuner.runtime.spec import MLASpec

OP_TYPE = "mla_paged"

FIB_PUBLIC = (
    "mla_paged_decode_h16_ckv512_kpe64_ps1",
    "mla_paged_decode_h16_ckv512_kpe64_ps64",
    "mla_paged_decode_h8_ckv512_kpe64_ps1",
    "mla_paged_prefill_causal_h16_ckv512_kpe64_ps1",
    "mla_paged_prefill_causal_h16_ckv512_kpe64_ps64",
    "mla_paged_prefill_causal_h8_ckv512_kpe64_ps1",
)
"""The ``mla_paged`` definitions FlashInfer-Bench 0.1.2 publishes (DeepSeek-V3/R1 and Kimi-K2 at tensor
parallel 8)."""

OUTPUTS = ("output", "lse")


def has_last_page_len(spec: MLASpec) -> bool:
    """Whether the definition takes ``kv_last_page_len``: FlashInfer-Bench leaves it out at page size 1,
    where every page holds one token."""
    return spec.page_size > 1


def input_names(spec: MLASpec) -> tuple[str, ...]:
    """The definition's inputs in call order (FlashInfer-Bench's: ``kv_last_page_len`` before ``sm_scale``)."""
    names = ["q_nope", "q_pe", "ckv_cache", "kpe_cache"]
    if not spec.is_decode:
        names.append("qo_indptr")
    names += ["kv_indptr", "kv_indices"]
    if has_last_page_len(spec):
        names.append("kv_last_page_len")
    return (*names, "sm_scale")


def _axis(value: int | None, description: str) -> dict[str, Any]:
    if value is None:
        return {"type": "var", "description": description}
    return {"type": "const", "value": value, "description": description}


def _tensor(shape: list[str] | None, dtype: str, description: str) -> dict[str, Any]:
    return {"shape": shape, "dtype": dtype, "description": description}


def _axes(spec: MLASpec) -> dict[str, dict[str, Any]]:
    """In FlashInfer-Bench's order: decode starts with its batch; prefill has total_q after the constants
    and, where kv_last_page_len is an input, the batch last."""
    axes: dict[str, dict[str, Any]] = {}
    if spec.is_decode:
        axes["batch_size"] = _axis(None, "Requests in the batch; each has one query token.")
    axes["num_qo_heads"] = _axis(spec.num_heads, "Query heads on this GPU (after tensor parallelism).")
    axes["head_dim_ckv"] = _axis(spec.head_dim_ckv, "Width of the compressed latent: the key part and the value.")
    axes["head_dim_kpe"] = _axis(spec.head_dim_kpe, "Width of the rotary key part.")
    axes["page_size"] = _axis(spec.page_size, "Tokens per page of the cache.")
    if not spec.is_decode:
        axes["total_q"] = _axis(None, "Query tokens of all sequences together.")
    axes["num_pages"] = _axis(None, "Pages in the cache; sequences use any of them, in any order.")
    axes["len_indptr"] = _axis(None, "Sequences in the batch, plus one.")
    axes["num_kv_indices"] = _axis(None, "Page ids of all sequences together.")
    if not spec.is_decode and has_last_page_len(spec):
        axes["batch_size"] = _axis(None, "Sequences in the batch.")
    return axes


def _inputs(spec: MLASpec) -> dict[str, dict[str, Any]]:
    rows = "batch_size" if spec.is_decode else "total_q"
    per = "request" if spec.is_decode else "query token"
    described = {
        "q_nope": _tensor([rows, "num_qo_heads", "head_dim_ckv"], "bfloat16",
                          f"Queries in the compressed space (the up-projection absorbed), one row per {per}."),
        "q_pe": _tensor([rows, "num_qo_heads", "head_dim_kpe"], "bfloat16", "Rotary part of the queries."),
        "ckv_cache": _tensor(["num_pages", "page_size", "head_dim_ckv"], "bfloat16",
                             "Compressed latent of each cached token: attended as key part and as value."),
        "kpe_cache": _tensor(["num_pages", "page_size", "head_dim_kpe"], "bfloat16",
                             "Rotary key part of each cached token."),
        "qo_indptr": _tensor(["len_indptr"], "int32",
                             "Sequence b owns query rows qo_indptr[b]:qo_indptr[b + 1]: its last q_len tokens."),
        "kv_indptr": _tensor(["len_indptr"], "int32",
                             "Sequence b owns the page ids kv_indices[kv_indptr[b]:kv_indptr[b + 1]]."),
        "kv_indices": _tensor(["num_kv_indices"], "int32", "Page ids of all sequences, each one's in token order."),
        "kv_last_page_len": _tensor(["batch_size"], "int32", "Tokens in each sequence's last page (1..page_size)."),
        "sm_scale": _tensor(None, "float32", "Scale of the scores before the softmax; DeepSeek-V3/R1 and Kimi-K2 use "
                                             "1/sqrt(128 + 64), from the head dimensions before absorption."),
    }
    return {name: described[name] for name in input_names(spec)}


def _outputs(spec: MLASpec) -> dict[str, dict[str, Any]]:
    rows = "batch_size" if spec.is_decode else "total_q"
    return {
        "output": _tensor([rows, "num_qo_heads", "head_dim_ckv"], "bfloat16", "Attention output per row and head."),
        "lse": _tensor([rows, "num_qo_heads"], "float32",
                       "Log-sum-exp of the scaled scores in base 2; -inf for a row that sees no token."),
    }


def _constraints(spec: MLASpec) -> list[str]:
    if spec.is_decode:
        return ["len_indptr == batch_size + 1", "num_kv_indices == kv_indptr[-1].item()"]
    found = ["total_q == qo_indptr[-1].item()", "num_kv_indices == kv_indptr[-1].item()"]
    return found + (["len_indptr == batch_size + 1"] if has_last_page_len(spec) else [])


_REFERENCE = '''import math

import torch

HEADS, HEAD_DIM_CKV, HEAD_DIM_KPE, PAGE_SIZE = {heads}, {ckv}, {kpe}, {page_size}
CAUSAL = {causal}


@torch.no_grad()
def run({params}):
    """{name}: mla-tuner's float32 reference.

    Sequence b owns pages kv_indices[kv_indptr[b]:kv_indptr[b + 1]]; token j of it sits in slot j % PAGE_SIZE of
    its page j // PAGE_SIZE. Its query rows are its last q_len tokens{mask_note}. Scores are
    sm_scale * (q_nope . ckv + q_pe . kpe); the softmax weights the ckv rows (the values). lse is the natural
    log-sum-exp of the scores divided by ln 2; a row that sees no token gets output 0 and lse -inf.
    """
    rows = q_nope.shape[0]
{query_rows}
    batch = qo_indptr.shape[0] - 1
    assert tuple(q_nope.shape[1:]) == (HEADS, HEAD_DIM_CKV) and tuple(q_pe.shape) == (rows, HEADS, HEAD_DIM_KPE)
    assert tuple(ckv_cache.shape[1:]) == (PAGE_SIZE, HEAD_DIM_CKV)
    assert tuple(kpe_cache.shape) == (ckv_cache.shape[0], PAGE_SIZE, HEAD_DIM_KPE)
    assert kv_indptr.shape[0] == batch + 1 and kv_indices.shape[0] == int(kv_indptr[-1])
    assert int(qo_indptr[-1]) == rows
    device = q_nope.device
    output = torch.zeros(rows, HEADS, HEAD_DIM_CKV, dtype=q_nope.dtype, device=device)
    lse = torch.full((rows, HEADS), -math.inf, dtype=torch.float32, device=device)
    for b in range(batch):
        first_row, end_row = int(qo_indptr[b]), int(qo_indptr[b + 1])
        first_page, end_page = int(kv_indptr[b]), int(kv_indptr[b + 1])
        if end_row == first_row or end_page == first_page:
            continue
        kv_len = {kv_len}
        token = torch.arange(kv_len, device=device)
        page = kv_indices[first_page:end_page].long()[token // PAGE_SIZE]
        latent = ckv_cache[page, token % PAGE_SIZE].float()  # [kv_len, HEAD_DIM_CKV]
        rope = kpe_cache[page, token % PAGE_SIZE].float()  # [kv_len, HEAD_DIM_KPE]
        queries = q_nope[first_row:end_row].float()  # [q_len, HEADS, HEAD_DIM_CKV]
        scores = torch.einsum("rhc,tc->rht", queries, latent)
        scores = (scores + torch.einsum("rhk,tk->rht", q_pe[first_row:end_row].float(), rope)) * sm_scale
        if CAUSAL:
            last_seen = kv_len - (end_row - first_row) + torch.arange(end_row - first_row, device=device)
            scores = scores.masked_fill((token[None, :] > last_seen[:, None])[:, None, :], -math.inf)
        log_total = torch.logsumexp(scores, dim=-1)  # natural log, -inf where the row sees nothing
        weights = torch.exp(scores - torch.where(torch.isinf(log_total), 0.0, log_total)[..., None])
        output[first_row:end_row] = torch.einsum("rht,tc->rhc", weights, latent).to(output.dtype)
        lse[first_row:end_row] = log_total / math.log(2.0)
    return output, lse
'''


def reference_source(spec: MLASpec) -> str:
    """The definition's reference ``run``: self-contained (torch and math only), its parameters the
    definition's inputs in order; output in the query dtype (bf16 for the definition's inputs)."""
    if spec.is_decode:
        query_rows = "    qo_indptr = torch.arange(rows + 1, device=q_nope.device)  # one query per request"
        mask_note = " (one per request, which sees all its tokens)"
    else:
        query_rows = ""
        mask_note = (", query i of them at position kv_len - q_len + i, which sees tokens 0 .. that position"
                     if spec.causal else ", each of which sees all kv_len tokens (no mask)")
    if has_last_page_len(spec):
        kv_len = "(end_page - first_page - 1) * PAGE_SIZE + int(kv_last_page_len[b])"
    else:
        kv_len = "(end_page - first_page) * PAGE_SIZE  # full pages"
    source = _REFERENCE.format(
        heads=spec.num_heads, ckv=spec.head_dim_ckv, kpe=spec.head_dim_kpe, page_size=spec.page_size,
        causal=spec.causal, params=", ".join(input_names(spec)), name=spec.name(), mask_note=mask_note,
        query_rows=query_rows, kv_len=kv_len)
    return source.replace("\n\n    batch =", "\n    batch =")


def _description(spec: MLASpec) -> str:
    what = {"decode": "decode: one new query token per request",
            "prefill_causal": "causal prefill: each sequence's query tokens are its last ones, each sees the "
                              "tokens up to itself",
            "prefill": "prefill without a mask: every query token sees all of its sequence's tokens"}[spec.variant]
    return (f"Multi-head Latent Attention in the absorbed form over a paged KV cache, {what}; "
            f"{spec.num_heads} query heads, latent {spec.head_dim_ckv}, rotary part {spec.head_dim_kpe}, "
            f"{spec.page_size} token(s) per page. Written by mla-tuner for a shape of its catalogue that "
            "FlashInfer-Bench does not publish.")


def definition(spec: MLASpec) -> dict[str, Any]:
    """The FlashInfer-Bench ``Definition`` of ``spec`` as JSON data (FlashInfer-Bench's key order)."""
    return {
        "name": spec.name(),
        "description": _description(spec),
        "op_type": OP_TYPE,
        "tags": [f"stage:{'decode' if spec.is_decode else 'prefill'}", "source:mla-tuner"],
        "axes": _axes(spec),
        "constraints": _constraints(spec),
        "inputs": _inputs(spec),
        "outputs": _outputs(spec),
        "reference": reference_source(spec),
    }


def _interface(data: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """What a solution depends on: the name, the axes (kind and value) and the inputs and outputs (shape
    and dtype), each in order. Descriptions, tags, constraints and the reference code are left out."""
    return {
        "name": [(data.get("name"),)],
        "axes": [(k, a.get("type"), a.get("value")) for k, a in data.get("axes", {}).items()],
        "inputs": [(k, t.get("shape"), t.get("dtype")) for k, t in data.get("inputs", {}).items()],
        "outputs": [(k, t.get("shape"), t.get("dtype")) for k, t in data.get("outputs", {}).items()],
    }


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Where two definitions' interfaces differ (empty: a solution written for one serves the other)."""
    a, b = _interface(ours), _interface(theirs)
    return [f"{part}: ours {a[part]}, theirs {b[part]}" for part in a if a[part] != b[part]]
