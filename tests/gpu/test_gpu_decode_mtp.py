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
