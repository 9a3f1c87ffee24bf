"""Decode with several queries per request (the 4-D form) on a CUDA GPU in bf16: against the float32
reference, under CUDA-graph capture and replay (the qo_indptr made inside a capture), and from two streams
(the qo_indptr's first use guarded by an event). Run: ``python -m pytest tests/gpu -n 8``."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES, assert_matches, check_graph_replay, make_case, skewed_lengths

import tuner

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
HEADS = 16


def case_of(s_q: int, page_size: int, batch: int, seed: int):
    kv = [max(s_q, n) for n in skewed_lengths(batch - 2, 300, 5000, seed=seed)] + [s_q, s_q + 1]
    return make_case(HEADS, kv, [s_q] * batch, page_size=page_size, dtype=DTYPE, device=DEVICE, seed=seed,
                     spare_pages=16)


def q4(case, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = len(case.kv_lens)
    return (case.q_nope.view(batch, s_q, *case.q_nope.shape[1:]), case.q_pe.view(batch, s_q, *case.q_pe.shape[1:]))


def decode4(case, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuner.mla_decode(*q4(case, s_q), case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices,
                            case.sm_scale, case.kv_last_page_len)


def reference4(case, s_q: int):
    def ref() -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = case.prefill_ref()
        batch = len(case.kv_lens)
        return out.view(batch, s_q, HEADS, -1), lse.view(batch, s_q, HEADS)

    return ref


@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("s_q", [2, 4])
def test_matches_reference_and_replays_in_a_graph(s_q: int, page_size: int) -> None:
    case = case_of(s_q, page_size, batch=12, seed=600 + s_q + page_size)
    out, lse = decode4(case, s_q)
    torch.cuda.synchronize()
    assert out.shape == (12, s_q, HEADS, 512) and lse.shape == (12, s_q, HEADS)
    assert_matches(out, lse, *reference4(case, s_q)(), TOLERANCES[DTYPE])
    plan = case.plan_decode(q_len=s_q)
    check_graph_replay(case, lambda: plan.run(*q4(case, s_q), case.ckv_cache, case.kpe_cache),
                       lambda: plan.run(*q4(case, s_q), case.ckv_cache, case.kpe_cache), reference4(case, s_q))
    check_graph_replay(case, lambda: decode4(case, s_q), lambda: decode4(case, s_q), reference4(case, s_q))


def test_first_use_from_two_streams() -> None:
    """A new s_q's qo_indptr is made on one stream and used at once from another (no sync between)."""
    s_q = 7  # used by no other test: its qo_indptr is made here
    case = case_of(s_q, 64, batch=6, seed=650)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()  # the inputs are ready; what the side stream may miss is only the qo_indptr
    first = decode4(case, s_q)
    with torch.cuda.stream(side):
        second = decode4(case, s_q)
    torch.cuda.synchronize()
    ref = reference4(case, s_q)()
    assert_matches(*first, *ref, TOLERANCES[DTYPE])
    assert_matches(*second, *ref, TOLERANCES[DTYPE])


def kernel_forms(rows: int, page_size: int) -> dict[str, tuner.DecodeConfig]:
    """One config per stage-1 form of the decode kernel of `rows` heads: the Triton kernel gathering, the
    Triton kernel with bulk copies (pages of 16+), the warp-specialized kernel (gathering at page size 1,
    bulk copies otherwise), each with shares small enough to cut requests inside their drafts."""
    from tuner.runtime.config import ws_block_h, ws_tiles

    spec = tuner.MLASpec("decode", rows, 512, 64, page_size)
    block_h = min(rows, 64)
    forms = {"triton": tuner.DecodeConfig(block_h=min(rows, 32), block_n=32, programs_per_sm=2, split_tokens=32)}
    if page_size >= 16:
        forms["triton-tma"] = tuner.DecodeConfig(block_h=min(rows, 32), block_n=16, tma=1, num_stages=3,
                                                 programs_per_sm=2, split_tokens=16)
    block_n, stages = ws_tiles(spec)
    forms["ws"] = tuner.DecodeConfig(block_h=ws_block_h(spec), block_n=block_n, num_stages=stages, ws=1,
                                     split_tokens=64, pdl=1, merge_block_h=min(block_h, 8))
    return forms


PACKED = [(16, 2), (16, 4), (8, 2), (32, 2), (64, 2), (16, 8)]


@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize(("heads", "s_q"), PACKED, ids=[f"h{h}-q{q}" for h, q in PACKED])
def test_packed_kernel_forms(heads: int, s_q: int, page_size: int) -> None:
    """The rows of s_q queries x H heads packed in the decode kernel of s_q * H heads (16 to 128): every
    stage-1 form against the reference (the mask of the drafts in the Triton kernel, in its bulk-copy
    tiles, in the swapped-product and in the 64-row warp-specialized kernel)."""
    kv = [max(s_q, n) for n in skewed_lengths(10, 100, 3000, seed=heads + s_q)] + [s_q, s_q + 1, 65]
    case = make_case(heads, kv, [s_q] * len(kv), page_size=page_size, dtype=DTYPE, device=DEVICE,
                     seed=700 + heads + s_q + page_size, spare_pages=16)
    batch = len(kv)
    q = (case.q_nope.view(batch, s_q, heads, -1), case.q_pe.view(batch, s_q, heads, -1))
    rest = (case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices, case.sm_scale, case.kv_last_page_len)
    ref_out, ref_lse = case.prefill_ref()
    for name, config in kernel_forms(heads * s_q, page_size).items():
        out, lse = tuner.mla_decode(*q, *rest, config=config)
        torch.cuda.synchronize()
        assert_matches(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse, TOLERANCES[DTYPE], f"{name} {config}")
