"""The reference itself, against a naive float64 loop over (sequence, query, head, token), and the
comparison helper the kernel tests rely on (it must be able to fail)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOLERANCES, assert_matches, make_case

from tuner.harness.reference import kv_lengths, mla_decode_ref, mla_prefill_ref


def naive_prefill(case, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64, one (sequence, query, head) at a time, one token at a time, straight from the contract."""
    ps = case.page_size
    indptr = case.kv_indptr.tolist()
    pages = case.kv_indices.tolist()
    last = None if case.kv_last_page_len is None else case.kv_last_page_len.tolist()
    qo = case.qo_indptr.tolist() if case.qo_indptr is not None else list(range(len(indptr)))
    rows, heads, ckv = case.q_nope.shape
    out = torch.zeros(rows, heads, ckv, dtype=torch.float64)
    lse = torch.full((rows, heads), float("-inf"), dtype=torch.float64)
    for b in range(len(indptr) - 1):
        n_pages = indptr[b + 1] - indptr[b]
        used_last = ps if (last is None or ps == 1) else last[b]
        kv_len = (n_pages - 1) * ps + used_last if n_pages else 0
        q_len = qo[b + 1] - qo[b]
        for i in range(q_len):
            row = qo[b] + i
            pos = kv_len - q_len + i
            visible = [t for t in range(kv_len) if not causal or t <= pos]
            for h in range(heads):
                scores, values = [], []
                for t in visible:
                    page = pages[indptr[b] + t // ps]
                    ckv_t = case.ckv_cache[page, t % ps].double()
                    kpe_t = case.kpe_cache[page, t % ps].double()
                    s = (float(case.q_nope[row, h].double() @ ckv_t)
                         + float(case.q_pe[row, h].double() @ kpe_t)) * case.sm_scale
                    scores.append(s)
                    values.append(ckv_t)
                if not scores:
                    continue
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                out[row, h] = sum(w * v for w, v in zip(weights, values, strict=True)) / total
                lse[row, h] = (m + math.log(total)) / math.log(2.0)
    return out, lse


REF_TOL = TOLERANCES[torch.float32]


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("last_page_len", [True, False])
def test_decode_reference_matches_naive_loop(page_size: int, last_page_len: bool) -> None:
    kv = [0, 5, 8, 1] if last_page_len else [0, 4, 8, 12]
    case = make_case(3, kv, page_size=page_size, ckv=16, kpe=16, seed=11, last_page_len=last_page_len)
    out, lse = mla_decode_ref(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, case.kv_indptr,
                              case.kv_indices, case.sm_scale, case.kv_last_page_len)
    want_out, want_lse = naive_prefill(case, causal=False)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_matches(out, lse, want_out.float(), want_lse.float(), REF_TOL, "decode reference")
    assert bool(torch.isneginf(lse[0]).all()) and bool((out[0] == 0).all())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("page_size", [1, 4])
def test_prefill_reference_matches_naive_loop(causal: bool, page_size: int) -> None:
    case = make_case(2, [6, 0, 9, 3], [6, 0, 2, 1], page_size=page_size, ckv=16, kpe=16, seed=12)
    out, lse = mla_prefill_ref(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, case.qo_indptr,
                               case.kv_indptr, case.kv_indices, case.sm_scale, case.kv_last_page_len,
                               causal=causal)
    want_out, want_lse = naive_prefill(case, causal)
    assert_matches(out, lse, want_out.float(), want_lse.float(), REF_TOL, "prefill reference")


def test_reference_rows_that_see_nothing() -> None:
    """q_len > kv_len (invalid, but defined): causal rows before position 0 see no token."""
    case = make_case(2, [2, 0], [4, 2], page_size=1, ckv=16, kpe=16, seed=13)
    out, lse = case.prefill_ref(causal=True)
    want_out, want_lse = naive_prefill(case, causal=True)
    assert_matches(out, lse, want_out.float(), want_lse.float(), REF_TOL)
    assert bool(torch.isneginf(lse[:2]).all()) and bool(torch.isfinite(lse[2:4]).all())
    assert bool(torch.isneginf(lse[4:]).all())


def test_kv_lengths() -> None:
    indptr = torch.tensor([0, 0, 2, 5, 6], dtype=torch.int32)
    last = torch.tensor([0, 3, 1, 16], dtype=torch.int32)
    assert kv_lengths(indptr, 16, last).tolist() == [0, 19, 33, 16]
    assert kv_lengths(indptr, 16, None).tolist() == [0, 32, 48, 16]
    assert kv_lengths(indptr, 1, last).tolist() == [0, 2, 3, 1]  # page_size 1 ignores last_page_len


def test_comparison_fails_on_a_wrong_answer() -> None:
    """The tolerances are tight enough to catch one missing token, a wrong lse, a NaN, a non-zero
    empty row."""
    case = make_case(4, [7, 0, 5], page_size=1, ckv=32, kpe=16, seed=14)
    out, lse = case.decode_ref()
    assert_matches(out, lse, out.clone(), lse.clone())
    short = case.replace(kv_indptr=torch.tensor([0, 6, 6, 11], dtype=torch.int32),
                         kv_indices=torch.cat([case.kv_indices[:6], case.kv_indices[7:]]))
    short_out, short_lse = short.decode_ref()
    with pytest.raises(AssertionError):
        assert_matches(short_out, short_lse, out, lse)
    for tol in TOLERANCES.values():  # a 1% error in a few elements fails even the bf16 bar
        wrong = out.clone()
        wrong[0, 0, :8] += 0.02 + 0.02 * wrong[0, 0, :8].abs()
        with pytest.raises(AssertionError, match="elements miss"):
            assert_matches(wrong, lse, out, lse, tol)
    with pytest.raises(AssertionError, match="lse"):
        assert_matches(out, lse + 2e-3, out, lse)
    nan_out = out.clone()
    nan_out[2, 1, 3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_matches(nan_out, lse, out, lse)
    nonzero = out.clone()
    nonzero[1, 0, 0] = 1e-30
    with pytest.raises(AssertionError, match="exactly 0"):
        assert_matches(nonzero, lse, out, lse)
