"""Decode with several queries per request (speculative decoding): ``tuner.mla_decode`` and ``MLADecode`` with
queries [B, s_q, H, *] (tuner.runtime.mtp), under the Triton interpreter.

The 4-D form is the causal prefill of s_q queries per request (query j of request b at position
kv_len(b) - s_q + j), checked against the float32 prefill reference on the flattened queries and, for the
position rule itself, against attention computed by hand per query. Two kernels run it: the decode kernel of
s_q * H heads with each request's rows packed (s_q * H a power of two up to 128), else (or forced by a
PrefillConfig) the causal prefill kernel; both are checked. The cases come from ``helpers.make_case`` with
q_lens [s_q] * B: partial last pages, unused slots and pages poisoned with NaN."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import assert_matches, count_runtime_allocations, forbid, fresh, make_case, poisoned_outputs

import tuner
from tuner import DecodeConfig, MLADecode, PrefillConfig, mla_decode
from tuner.runtime import decode, dispatch, launch, loader, mtp, paths, prefill, validate

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
HEADS = 16


def lengths(s_q: int, page_size: int) -> list[int]:
    """kv_len == s_q, partial last pages, a page boundary plus a few, whole pages; mixed."""
    return [s_q, 37, max(s_q, 2 * page_size + 3), 90, max(s_q, 2 * page_size)]


def case_of(s_q: int, kv_lens: list[int], page_size: int = 16, dtype: torch.dtype = torch.float16, seed: int = 0,
            **kwargs):
    return make_case(HEADS, kv_lens, [s_q] * len(kv_lens), page_size=page_size, dtype=dtype, seed=seed, **kwargs)


def q4(case, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's queries as [B, s_q, H, *] (views of its [B * s_q, H, *] rows)."""
    batch = len(case.kv_lens)
    return (case.q_nope.view(batch, s_q, *case.q_nope.shape[1:]), case.q_pe.view(batch, s_q, *case.q_pe.shape[1:]))


def decode4(case, s_q: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return mla_decode(*q4(case, s_q), case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices,
                      case.sm_scale, case.kv_last_page_len, **kwargs)


def plan4(case, s_q: int, **kwargs) -> MLADecode:
    return case.plan_decode(q_len=s_q, **kwargs)


def run4(plan: MLADecode, case, s_q: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return plan.run(*q4(case, s_q), case.ckv_cache, case.kpe_cache, **kwargs)


def poisoned4(case, s_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = len(case.kv_lens)
    out, lse = poisoned_outputs(batch * s_q, HEADS, case.q_nope.shape[2], case.q_nope.dtype)
    return out.view(batch, s_q, HEADS, -1), lse.view(batch, s_q, HEADS)


def assert_reference(case, s_q: int, out: torch.Tensor, lse: torch.Tensor) -> None:
    batch = len(case.kv_lens)
    assert out.shape == (batch, s_q, HEADS, case.q_nope.shape[2]) and lse.shape == (batch, s_q, HEADS)
    assert out.dtype == case.q_nope.dtype and lse.dtype == torch.float32
    assert_matches(out.flatten(0, 1), lse.flatten(0, 1), *case.prefill_ref())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("s_q", [2, 3, 4, 8])
def test_matches_reference(s_q: int, page_size: int, dtype: torch.dtype) -> None:
    """One call into NaN-poisoned out=/lse= (written in place and returned), then plan/run: the same bits. s_q
    2, 4, 8 run packed in the decode kernel of 32, 64, 128 heads; 3 (48 rows) the causal prefill."""
    case = case_of(s_q, lengths(s_q, page_size), page_size, dtype, seed=s_q + page_size)
    out, lse = poisoned4(case, s_q)
    got = decode4(case, s_q, out=out, lse=lse)
    assert got[0] is out and got[1] is lse, "out=/lse= must be written in place and returned"
    assert_reference(case, s_q, out, lse)
    plan = plan4(case, s_q)
    if s_q == 3:
        assert plan.spec.variant == "prefill_causal" and isinstance(plan.config, PrefillConfig)
    else:
        assert plan.spec == tuner.MLASpec("decode", s_q * HEADS, 512, 64, page_size)
        assert isinstance(plan.config, DecodeConfig)
    planned = run4(plan, case, s_q)
    assert torch.equal(planned[0], out) and torch.equal(planned[1], lse)


PACKED_CONFIGS = {
    "one-share": DecodeConfig(block_h=16, block_n=16, programs_per_sm=1, split_tokens=1 << 24),
    "many-shares": DecodeConfig(block_h=16, block_n=16, programs_per_sm=4, split_tokens=16),
    "wide": DecodeConfig(block_h=64, block_n=32, programs_per_sm=2, split_tokens=16, merge_block_h=32),
}


@pytest.mark.parametrize("config", PACKED_CONFIGS.values(), ids=PACKED_CONFIGS.keys())
@pytest.mark.parametrize(("heads", "s_q"), [(8, 2), (16, 4), (32, 2), (8, 8)])
def test_packed_shares_and_heads(heads: int, s_q: int, config: DecodeConfig) -> None:
    """The packed decode kernel with forced configs: shares that cut requests anywhere (so a piece may end
    inside the drafts, or hold only tokens some rows do not see), head groups of 16 rows inside one query
    or across queries, other head counts; against the reference and against the causal prefill kernel."""
    page_size = 16
    rows = heads * s_q
    config = dataclasses.replace(config, block_h=min(config.block_h, rows),
                                 merge_block_h=min(config.merge_block_h, rows))
    kv = [s_q, 19, 2 * page_size + s_q - 1, 70, 33]
    case = make_case(heads, kv, [s_q] * len(kv), page_size=page_size, dtype=torch.float32, seed=heads + s_q)
    batch = len(kv)
    q = (case.q_nope.view(batch, s_q, heads, -1), case.q_pe.view(batch, s_q, heads, -1))
    rest = (case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices, case.sm_scale, case.kv_last_page_len)
    out, lse = mla_decode(*q, *rest, config=config)
    assert_matches(out.flatten(0, 1), lse.flatten(0, 1), *case.prefill_ref())
    block_h = min(16, heads)
    causal = mla_decode(*q, *rest, config=PrefillConfig(block_m=32 // block_h, block_h=block_h, block_n=16))
    assert torch.allclose(out, causal[0], atol=1e-5, rtol=1e-5) and torch.allclose(lse, causal[1], atol=1e-5)


def by_hand(case, s_q: int, b: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query j of request b by the contract's words, in float64: it sits at position kv_len - s_q + j and
    sees the tokens 0 .. that position, token t at slot t % page_size of page kv_indices[kv_indptr[b] + t //
    page_size]. (output [H, ckv], lse [H] base 2); a query that sees nothing: 0 and -inf."""
    ps, position = case.page_size, case.kv_lens[b] - s_q + j
    q_nope, q_pe = (q[b, j].double() for q in q4(case, s_q))
    if position < 0:
        return torch.zeros_like(q_nope), torch.full(q_nope.shape[:1], -math.inf, dtype=torch.float64)
    pages = case.kv_indices[int(case.kv_indptr[b]):int(case.kv_indptr[b + 1])].long()
    tokens = torch.arange(position + 1)
    ckv = case.ckv_cache[pages[tokens // ps], tokens % ps].double()
    kpe = case.kpe_cache[pages[tokens // ps], tokens % ps].double()
    scores = (q_nope @ ckv.T + q_pe @ kpe.T) * case.sm_scale
    return torch.softmax(scores, -1) @ ckv, torch.logsumexp(scores, -1) / math.log(2)


@pytest.mark.parametrize("page_size", [1, 16])
def test_position_rule_by_hand(page_size: int) -> None:
    """Every (request, query) against attention computed by hand from the position rule, fp32; with
    kv_len == s_q, a single page, partial pages; and without validation a request shorter than s_q, whose
    first queries see nothing (output 0, lse -inf)."""
    s_q = 4
    case = case_of(s_q, [4, 5, 19, 40, 2], page_size, torch.float32, seed=7)
    out, lse = decode4(case, s_q)
    for b in range(len(case.kv_lens)):
        for j in range(s_q):
            want_out, want_lse = by_hand(case, s_q, b, j)
            assert torch.allclose(out[b, j].double(), want_out, atol=1e-4, rtol=1e-4), (b, j)
            assert torch.allclose(lse[b, j].double(), want_lse, atol=1e-4, rtol=0, equal_nan=False), (b, j)
    assert bool((out[4, :2] == 0).all()) and bool(torch.isneginf(lse[4, :2]).all())
    assert bool(torch.isfinite(lse[4, 2:]).all())


def test_runs_the_causal_prefill() -> None:
    """The 4-D form is the causal prefill of qo_indptr = arange(B + 1) * s_q on the flattened queries, bit
    for bit, with the same forced config."""
    s_q, config = 3, PrefillConfig(block_m=2, block_h=16, block_n=16)
    case = case_of(s_q, [3, 40, 17, 64], 16, seed=3)
    assert torch.equal(case.qo_indptr, torch.arange(5, dtype=torch.int32) * s_q)
    out, lse = decode4(case, s_q, config=config)
    want = case.prefill(config=config)
    assert torch.equal(out.flatten(0, 1), want[0]) and torch.equal(lse.flatten(0, 1), want[1])
    assert_reference(case, s_q, out, lse)
    assert torch.equal(run4(plan4(case, s_q, config=config), case, s_q)[0], out)


def test_one_query_per_request_is_the_decode() -> None:
    """[B, 1, H, *] runs the decode kernel: equal to the 3-D form, one call and planned (q_len=1 plans take
    both forms); an empty request keeps decode's rule (output 0, lse -inf), also under validation."""
    case = make_case(HEADS, [0, 5, 37, 90], page_size=16, dtype=torch.float16, seed=4)
    want_out, want_lse = case.decode()
    q_nope, q_pe = case.q_nope[:, None], case.q_pe[:, None]
    rest = (case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices, case.sm_scale, case.kv_last_page_len)
    out, lse = mla_decode(q_nope, q_pe, *rest, validate_data=True)
    assert out.shape == (4, 1, HEADS, 512) and lse.shape == (4, 1, HEADS)
    assert torch.equal(out[:, 0], want_out) and torch.equal(lse[:, 0], want_lse)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())
    plan = case.plan_decode()
    assert plan.q_len == 1 and plan.spec.variant == "decode"
    planned = plan.run(q_nope, q_pe, case.ckv_cache, case.kpe_cache)
    assert torch.equal(planned[0], out) and torch.equal(planned[1], lse)
    assert torch.equal(plan.run(*case.queries())[0], want_out), "the 3-D form still runs on the same plan"


def test_kv_len_below_s_q() -> None:
    """kv_len < s_q: a ValueError naming kv_indptr wherever the index data is checked (validate_data, plan(),
    MLA_TUNER_VALIDATE); unchecked, the queries placed before position 0 see nothing (output 0, lse -inf)."""
    s_q = 4
    case = case_of(s_q, [30, 2, 0, 4], 16, seed=5)
    pattern = r"^kv_indptr: expected kv_len >= s_q = 4 for every sequence .*found kv_len 2 at sequence 1"
    with pytest.raises(ValueError, match=pattern):
        decode4(case, s_q, validate_data=True)
    with pytest.raises(ValueError, match=pattern):
        plan4(case, s_q)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paths.ENV_VALIDATE, "1")
        with pytest.raises(ValueError, match=pattern):
            decode4(case, s_q)
        with pytest.raises(ValueError, match=pattern):
            plan4(case, s_q, validate_data=False)
    out, lse = decode4(case, s_q)
    assert_reference(case, s_q, out, lse)
    assert bool((out[1, :2] == 0).all()) and bool(torch.isneginf(lse[1, :2]).all())
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())
    planned = run4(plan4(case, s_q, validate_data=False), case, s_q)
    assert torch.equal(planned[0], out) and torch.equal(planned[1], lse)


def test_outputs_allocated_or_given() -> None:
    s_q = 2
    case = case_of(s_q, [2, 33, 17], 16, seed=6)
    out, lse = decode4(case, s_q)
    assert out.is_contiguous() and lse.is_contiguous() and out.shape == (3, 2, HEADS, 512)
    given_out = torch.empty(3, 2, HEADS, 512, dtype=torch.float16)
    got = decode4(case, s_q, out=given_out)
    assert got[0] is given_out and torch.equal(got[0], out) and torch.equal(got[1], lse)
    given_lse = torch.empty(3, 2, HEADS)
    plan = plan4(case, s_q)
    got = run4(plan, case, s_q, lse=given_lse)
    assert got[1] is given_lse and torch.equal(got[0], out) and torch.equal(got[1], lse)


def test_strided_views() -> None:
    """Queries and caches as views of 576-wide tensors give the same bits as contiguous ones; out/lse as
    padded views are written in their own elements only. Padded heads cannot be packed: the packed kernel
    refuses them (ValueError naming the tensor), the causal prefill (a PrefillConfig) takes them."""
    s_q = 2
    fused = case_of(s_q, [2, 40, 17], 16, seed=8, fused=True)
    assert not fused.q_nope.is_contiguous() and fused.ckv_cache.stride(1) == 576
    dense = fused.replace(**{k: getattr(fused, k).contiguous() for k in ("q_nope", "q_pe", "ckv_cache", "kpe_cache")})
    out_buf, lse_buf = torch.full((3, 2, HEADS, 640), 7.0, dtype=torch.float16), torch.full((3, 2, 20), 7.0)
    out, lse = decode4(fused, s_q, out=out_buf[..., :512])
    want = decode4(dense, s_q)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert_reference(dense, s_q, out, lse)
    assert bool((out_buf[..., 512:] == 7.0).all())
    with pytest.raises(ValueError, match=r"^lse: expected \[B, s_q, H, \.\.\.\] whose axes 1 and 2 can be viewed"):
        decode4(fused, s_q, lse=lse_buf[..., :HEADS])
    config = PrefillConfig(block_m=2, block_h=16, block_n=16)
    out, lse = decode4(fused, s_q, out=out_buf[..., :512], lse=lse_buf[..., :HEADS], config=config)
    assert_reference(dense, s_q, out, lse)
    assert bool((out_buf[..., 512:] == 7.0).all()) and bool((lse_buf[..., HEADS:] == 7.0).all())


def test_batch_of_zero() -> None:
    case = case_of(2, [], 16, seed=9)
    q_nope, q_pe = (q.view(0, 2, *q.shape[1:]) for q in case.queries()[:2])
    out, lse = mla_decode(q_nope, q_pe, case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices,
                          case.sm_scale, case.kv_last_page_len)
    assert out.shape == (0, 2, HEADS, 512) and lse.shape == (0, 2, HEADS)
    out, lse = case.plan_decode(q_len=2).run(q_nope, q_pe, case.ckv_cache, case.kpe_cache)
    assert out.shape == (0, 2, HEADS, 512) and lse.shape == (0, 2, HEADS)


# --- bad input: clear errors naming the argument, before any launch ---

class Launched(Exception):
    """Raised in place of a kernel launch by the ``no_launch`` fixture."""


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise Launched("the kernel would have been launched")

    monkeypatch.setattr(launch.LaunchPlan, "run", refuse)


def swapped(t: torch.Tensor) -> torch.Tensor:
    """The same [B, s_q, ...] values stored s_q-major: its first two dimensions are not one view."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def args4(s_q: int = 2) -> dict:
    case = case_of(s_q, [2, 40, 17, 33], 16, seed=10)
    q_nope, q_pe = q4(case, s_q)
    return dict(q_nope=q_nope, q_pe=q_pe, ckv_cache=case.ckv_cache, kpe_cache=case.kpe_cache,
                kv_indptr=case.kv_indptr, kv_indices=case.kv_indices, sm_scale=case.sm_scale,
                kv_last_page_len=case.kv_last_page_len)


def queries(s_q: int) -> dict:
    case = case_of(s_q, [40] * 4, 16, seed=11)
    return dict(zip(("q_nope", "q_pe"), q4(case, s_q), strict=True))


def outputs(out_shape: tuple[int, ...] | None = None, lse_shape: tuple[int, ...] | None = None) -> dict:
    out = torch.empty(*(out_shape or (4, 2, HEADS, 512)), dtype=torch.float16)
    return dict(out=out, lse=torch.empty(*(lse_shape or (4, 2, HEADS))))


BAD: list[tuple[str, dict, type[Exception], str]] = [
    ("s_q-9", queries(9), ValueError, r"^q_nope: expected 1 to 8 queries per request .*found 9"),
    ("s_q-0", {k: v[:, :0] for k, v in queries(2).items()}, ValueError,
     r"^q_nope: expected 1 to 8 queries per request .*found 0"),
    ("q_pe-3d", {"q_pe": torch.randn(8, HEADS, 64, dtype=torch.float16)}, ValueError,
     r"^q_pe: expected 4 dimensions \[B, s_q, H, kpe\], found 3"),
    ("q_pe-batch", {"q_pe": torch.randn(3, 2, HEADS, 64, dtype=torch.float16)}, ValueError,
     r"^q_pe: expected shape \(4, 2, 16, \*\), found \(3, 2, 16, 64\) \(axis 0\)"),
    ("q_pe-s_q", {"q_pe": torch.randn(4, 3, HEADS, 64, dtype=torch.float16)}, ValueError,
     r"^q_pe: expected shape \(4, 2, 16, \*\), found \(4, 3, 16, 64\) \(axis 1\)"),
    ("q_pe-heads", {"q_pe": torch.randn(4, 2, 8, 64, dtype=torch.float16)}, ValueError,
     r"^q_pe: expected shape \(4, 2, 16, \*\), found \(4, 2, 8, 64\) \(axis 2\)"),
    ("q_nope-not-viewable", {"q_nope": swapped(torch.randn(4, 2, HEADS, 512, dtype=torch.float16))}, ValueError,
     r"^q_nope: expected \[B, s_q, \.\.\.\] whose first two dimensions can be viewed as one"),
    ("q_nope-dtype", {"q_nope": torch.randn(4, 2, HEADS, 512)}, TypeError,
     r"^q_nope: expected dtype torch.float16 \(that of ckv_cache and kpe_cache\), found torch.float32"),
    ("q_nope-strided", {"q_nope": torch.randn(4, 2, HEADS, 1024, dtype=torch.float16)[..., ::2]}, ValueError,
     r"^q_nope: expected a contiguous last dimension"),
    ("out-3d", outputs(out_shape=(8, HEADS, 512)), ValueError, r"^out: expected 4 dimensions, found 3"),
    ("out-s_q", outputs(out_shape=(4, 3, HEADS, 512)), ValueError,
     r"^out: expected shape \(4, 2, 16, 512\), found \(4, 3, 16, 512\)"),
    ("lse-2d", outputs(lse_shape=(8, HEADS)), ValueError, r"^lse: expected 3 dimensions, found 2"),
    ("lse-heads", outputs(lse_shape=(4, 2, 8)), ValueError, r"^lse: expected shape \(4, 2, 16\)"),
    ("out-not-viewable", {"out": swapped(torch.empty(4, 2, HEADS, 512, dtype=torch.float16))}, ValueError,
     r"^out: expected \[B, s_q, \.\.\.\] whose first two dimensions can be viewed as one"),
    ("q_nope-not-packable", {"q_nope": torch.randn(4, 2, 20, 512, dtype=torch.float16)[:, :, :HEADS]}, ValueError,
     r"^q_nope: expected \[B, s_q, H, \.\.\.\] whose axes 1 and 2 can be viewed as one of s_q \* H rows"),
    ("out-not-packable", {"out": torch.empty(4, 2, 20, 512, dtype=torch.float16)[:, :, :HEADS]}, ValueError,
     r"^out: expected \[B, s_q, H, \.\.\.\] whose axes 1 and 2 can be viewed as one"),
    ("kv_indptr-short", {"kv_indptr": torch.zeros(4, dtype=torch.int32)}, ValueError,
     r"^kv_indptr: expected shape \(5,\), found \(4,\)"),
    ("config-other", {"config": "fast"}, TypeError,
     r"^config: expected a DecodeConfig \(the packed decode kernel\) or a PrefillConfig \(the causal prefill "
     r"kernel\) for s_q = 2 queries per request, found str"),
]


def test_decode_config_where_nothing_packs(no_launch: None) -> None:
    """A DecodeConfig for s_q x H rows the decode kernel does not pack (48): a TypeError naming config."""
    args = args4(3)
    with pytest.raises(TypeError, match=r"^config: a DecodeConfig runs s_q x H rows per request packed in the "
                                        r"decode kernel, which takes a power of two up to 128 rows; found s_q = 3"):
        mla_decode(**args, config=DecodeConfig())
    with pytest.raises(Launched):
        mla_decode(**args, config=PrefillConfig())


@pytest.mark.parametrize(("changes", "error", "pattern"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(changes: dict, error: type[Exception], pattern: str, no_launch: None) -> None:
    with pytest.raises(error, match=pattern):
        mla_decode(**{**args4(), **changes})
    with pytest.raises(Launched):  # the control
        mla_decode(**args4())


def test_bad_planned_input(no_launch: None) -> None:
    args = args4()
    common = dict(num_heads=HEADS, page_size=16, sm_scale=args["sm_scale"])
    layout = (args["kv_indptr"], args["kv_indices"], args["kv_last_page_len"])
    for q_len, error, pattern in ((0, ValueError, r"^q_len: expected 1 to 8 queries per request, found 0"),
                                  (9, ValueError, r"^q_len: expected 1 to 8"),
                                  (True, TypeError, r"^q_len: expected an int, found bool"),
                                  (2.0, TypeError, r"^q_len: expected an int, found float")):
        with pytest.raises(error, match=pattern):
            MLADecode().plan(*layout, q_len=q_len, **common)
    with pytest.raises(TypeError, match=r"^config: a DecodeConfig runs s_q x H rows per request packed"):
        MLADecode().plan(*layout, q_len=3, config=DecodeConfig(), validate_data=False, **common)
    with pytest.raises(TypeError, match=r"^config: expected a DecodeConfig for one query per request"):
        MLADecode().plan(*layout, config=PrefillConfig(), **common)
    plan = MLADecode().plan(*layout, q_len=2, **common)
    caches = (args["ckv_cache"], args["kpe_cache"])
    q_nope, q_pe = args["q_nope"], args["q_pe"]
    with pytest.raises(ValueError, match=r"^q_nope: expected 4 dimensions \[B, s_q, H, ckv\] \(the plan's q_len = "
                                         r"2\), found 3 \(shape \(8, 16, 512\)\)"):
        plan.run(q_nope.flatten(0, 1), q_pe.flatten(0, 1), *caches)
    three = queries(3)
    with pytest.raises(ValueError, match=r"^q_nope: expected s_q = 2 \(the plan's q_len; axis 1 of \[B, s_q, H, "
                                         r"ckv\]\), found 3"):
        plan.run(three["q_nope"], three["q_pe"], *caches)
    with pytest.raises(ValueError, match=r"^q_nope: expected shape \(4, 2, \*, \*\), found \(3, 2, 16, 512\)"):
        plan.run(q_nope[:3], q_pe[:3], *caches)
    with pytest.raises(ValueError, match=r"^lse: expected shape \(4, 2, 16\)"):
        plan.run(q_nope, q_pe, *caches, lse=torch.empty(4, 2, 8))
    with pytest.raises(ValueError, match=r"^q_nope: expected s_q = 1 \(the plan's q_len"):
        MLADecode().plan(*layout, **common).run(q_nope, q_pe, *caches)
    with pytest.raises(ValueError, match=r"^q_pe: expected \[B, s_q, H, \.\.\.\] whose axes 1 and 2 can be viewed"):
        plan.run(q_nope, torch.randn(4, 2, 20, 64, dtype=torch.float16)[:, :, :HEADS], *caches)
    with pytest.raises(Launched):
        plan.run(q_nope, q_pe, *caches)


# --- the lean launch path: the second call with new tensors of the same metadata is replayed ---

@pytest.mark.parametrize("s_q", [1, 2, 3])
def test_second_calls_replay(monkeypatch: pytest.MonkeyPatch, s_q: int) -> None:
    """After a first one-call and a first run(), calls with new tensors of the same metadata skip validation,
    the dispatch, the module's launch() and the qo_indptr, and allocate only their outputs (and, one-call
    in the decode kernel, packed or not, its split scratch)."""
    case = case_of(s_q, [s_q, 40, 17, 70], 16, seed=12 + s_q)
    plan = plan4(case, s_q)
    decode4(case, s_q)
    run4(plan, case, s_q, out=poisoned4(case, s_q)[0], lse=poisoned4(case, s_q)[1])
    forbid(monkeypatch, (validate, "spec_from_tensors"), (validate, "check_inputs"), (mtp, "check_queries"),
           (dispatch, "select"), (mtp, "_arange"), (prefill._Plan, "launch"), (decode._Plan, "launch"),
           (loader, "load_module"))
    allocations = count_runtime_allocations(monkeypatch)
    new = fresh(case, 13)
    out, lse = decode4(new, s_q)
    assert_reference(new, s_q, out, lse)
    given = poisoned4(new, s_q)
    got = run4(plan, new, s_q, out=given[0], lse=given[1])
    assert got[0] is given[0] and torch.equal(got[0], out) and torch.equal(got[1], lse)
    one_call = ["outputs", "outputs"] + (["scratch", "scratch"] if plan.spec.is_decode else [])
    assert allocations == one_call


# --- the qo_indptr: made once per (s_q, device), a prefix of it per batch, never freed ---

@pytest.fixture
def own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mtp, "_HELD", {})
    monkeypatch.setattr(mtp, "_KEPT", [])


def test_qo_indptr_is_a_kept_prefix(own_store: None) -> None:
    cpu = torch.device("cpu")
    qo, keep = mtp.qo_indptr(3, 2, cpu)
    assert keep and torch.equal(qo, torch.tensor([0, 2, 4, 6], dtype=torch.int32))
    again, _ = mtp.qo_indptr(10, 2, cpu)
    assert again.data_ptr() == qo.data_ptr() and torch.equal(again, torch.arange(11, dtype=torch.int32) * 2)
    other, _ = mtp.qo_indptr(3, 4, cpu)
    assert torch.equal(other, torch.tensor([0, 4, 8, 12], dtype=torch.int32))
    first = mtp._HELD[(2, cpu)].tensor
    big, keep = mtp.qo_indptr(1000, 2, cpu)
    assert keep and big.numel() == 1001 and int(big[-1]) == 2000 and big.data_ptr() != qo.data_ptr()
    assert any(held.tensor is first for held in mtp._KEPT), "a replaced tensor is kept alive (graphs may read it)"


def test_qo_indptr_during_a_capture_and_before_its_kernel_ran(monkeypatch: pytest.MonkeyPatch,
                                                              own_store: None) -> None:
    """While a graph is captured a new qo_indptr is made in the graph and nothing is kept; a kept one is not
    handed out to be kept until the kernel that made it was seen to run (the current stream waits for it)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(mtp, "_capturing", lambda device: True)
    qo, keep = mtp.qo_indptr(3, 2, cpu)
    assert not keep and torch.equal(qo, torch.tensor([0, 2, 4, 6], dtype=torch.int32)) and not mtp._HELD
    plan = mtp.CausalPlan(tuner.MLASpec("prefill_causal", HEADS, 512, 64, 16), PrefillConfig(), 3, 2, 1.0, cpu)
    assert torch.equal(plan.qo_indptr(), qo) and plan._qo_indptr is None
    monkeypatch.setattr(mtp, "_capturing", lambda device: False)
    event, waits = object(), []
    monkeypatch.setattr(mtp, "_made", lambda device: event)
    monkeypatch.setattr(mtp, "_pending", lambda e, device: waits.append(e) or len(waits) == 1)
    assert torch.equal(plan.qo_indptr(), qo) and plan._qo_indptr is None and waits == [event]
    assert torch.equal(plan.qo_indptr(), qo) and plan._qo_indptr is not None and waits == [event, event]
    assert mtp._HELD[(2, cpu)].event is None
    assert plan.qo_indptr() is plan._qo_indptr and len(waits) == 2
