"""Prefill kernels (causal and non-causal) under the Triton interpreter against the float32
reference: the edge cases of ``docs/contract.md`` at small sizes, launch configs, plan/run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_matches, make_case, poisoned_outputs

from tuner import MLAPrefill, MLASpec, PrefillConfig
from tuner.runtime import loader

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="noncausal")]

# (kv_lens, q_lens) per scenario; kv lengths cross page boundaries at every page size tested.
SCENARIOS = {
    "fresh": ([7, 33, 1, 20], [7, 33, 1, 20]),  # kv = q: new prompts
    "prefix": ([150], [3]),  # a long prefix, few queries (chunked prefill)
    "varlen": ([1, 90, 12, 40, 0, 9], [1, 37, 0, 5, 0, 9]),  # skewed, with q_len 0 and kv_len 0
}


def check_prefill(case, causal: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run prefill into NaN-poisoned outputs and compare with the reference."""
    rows = case.q_nope.shape[0]
    out, lse = poisoned_outputs(rows, case.num_heads, case.q_nope.shape[2], case.q_nope.dtype)
    got_out, got_lse = case.prefill(causal, out=out, lse=lse, **kwargs)
    assert got_out is out and got_lse is lse, "out=/lse= must be written in place and returned"
    assert_matches(out, lse, *case.prefill_ref(causal))
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_reference(scenario: str, page_size: int, causal: bool, dtype: torch.dtype) -> None:
    kv, q = SCENARIOS[scenario]
    case = make_case(16, kv, q, page_size=page_size, dtype=dtype, seed=page_size + len(scenario))
    check_prefill(case, causal)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("page_size", [16, 64])
def test_full_pages_without_last_page_len(page_size: int, causal: bool) -> None:
    case = make_case(8, [2 * page_size, page_size, 0], [page_size + 3, 2, 0], page_size=page_size,
                     last_page_len=False, seed=50)
    assert case.kv_last_page_len is None
    check_prefill(case, causal)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("page_size", [1, 16])
def test_one_token_queries_equal_decode(page_size: int, causal: bool) -> None:
    """With q_len 1 every query sees its whole sequence: prefill computes what decode does."""
    case = make_case(16, [1, 40, 17, 64, 3], [1] * 5, page_size=page_size, seed=51)
    out_p, lse_p = check_prefill(case, causal)
    out_d, lse_d = case.replace(qo_indptr=None).decode()
    assert_matches(out_p, lse_p, out_d.float(), lse_d)


def test_sequences_without_queries_write_nothing() -> None:
    """q_len 0 sequences have no rows; out/lse views inside guarded buffers: only their rows change."""
    case = make_case(16, [5, 30, 9, 40, 0], [0, 4, 0, 3, 0], page_size=16, seed=52)
    rows = 7
    out_buf = torch.full((rows + 3, 16, 512), 7.0)
    lse_buf = torch.full((rows + 3, 16), 3.0)
    out_buf[1:1 + rows] = float("nan")
    lse_buf[1:1 + rows] = float("nan")
    out, lse = out_buf[1:1 + rows], lse_buf[1:1 + rows]
    case.prefill(True, out=out, lse=lse)
    assert_matches(out, lse, *case.prefill_ref(True))
    for guard in (0, rows + 1, rows + 2):
        assert bool((out_buf[guard] == 7.0).all()) and bool((lse_buf[guard] == 3.0).all()), guard


def test_no_queries_at_all() -> None:
    case = make_case(16, [5, 30], [0, 0], page_size=16, seed=53)
    out, lse = case.prefill(True)
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)


def test_batch_of_zero() -> None:
    case = make_case(16, [], [], page_size=16, seed=54)
    for causal in (True, False):
        out, lse = case.prefill(causal)
        assert out.shape == (0, 16, 512) and lse.shape == (0, 16)
        out, lse = case.plan_prefill(causal).run(*case.queries())
        assert out.shape == (0, 16, 512)


@pytest.mark.parametrize("causal", CAUSAL)
def test_rows_that_see_nothing(causal: bool) -> None:
    """Without validate_data, q_len > kv_len runs: causal rows placed before position 0, and every
    row of a sequence without tokens, see nothing and get output 0, lse -inf (never NaN)."""
    case = make_case(16, [2, 0, 20], [5, 3, 4], page_size=16, seed=55)
    out, lse = check_prefill(case, causal)
    assert bool(torch.isneginf(lse[5:8]).all()) and bool((out[5:8] == 0).all())
    if causal:
        assert bool(torch.isneginf(lse[:3]).all())


@pytest.mark.parametrize("page_size", [1, 16])
def test_heads_128(page_size: int) -> None:
    case = make_case(128, [9, 0, 4], [3, 0, 4], page_size=page_size, dtype=torch.float16, seed=56)
    check_prefill(case, True)


@pytest.mark.parametrize("causal", CAUSAL)
def test_small_head_dims(causal: bool) -> None:
    case = make_case(16, [70, 5, 0], [6, 5, 0], page_size=64, ckv=256, kpe=32, seed=57)
    check_prefill(case, causal)


@pytest.mark.parametrize("causal", CAUSAL)
def test_head_count_outside_catalogue(causal: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLA_TUNER_CACHE_DIR", str(tmp_path))
    spec = MLASpec("prefill_causal" if causal else "prefill", 24, 512, 64, 16)
    path = loader.module_path(spec)  # cache/generated/<hash of the templates>/<name>.py
    assert path.name == f"{spec.name()}.py" and path.parent.parent == tmp_path / "generated"
    assert path.parent.name == loader._templates_hash()
    case = make_case(24, [20, 3, 33], [20, 1, 5], page_size=16, seed=58)
    check_prefill(case, causal)
    check_prefill(case, causal, config=PrefillConfig(block_m=1, block_h=32, block_n=16))


CONFIGS = [
    (16, PrefillConfig(block_m=1, block_h=16, block_n=16)),
    (16, PrefillConfig(block_m=16, block_h=16, block_n=16)),
    (16, PrefillConfig(block_m=2, block_h=16, block_n=64)),
    (16, PrefillConfig(block_m=4, block_h=8, block_n=32)),
    (8, PrefillConfig(block_m=2, block_h=8, block_n=16)),
    (32, PrefillConfig(block_m=1, block_h=32, block_n=32)),
    (32, PrefillConfig(block_m=8, block_h=4, block_n=16)),
    (16, PrefillConfig(block_m=2, block_h=16, block_n=16, tma=1)),  # bulk copies of the unmasked tiles
    (8, PrefillConfig(block_m=4, block_h=8, block_n=16, tma=1)),
]


CONFIG_IDS = [f"h{h}-m{c.block_m}-bh{c.block_h}-n{c.block_n}-t{c.tma}" for h, c in CONFIGS]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(("heads", "config"), CONFIGS, ids=CONFIG_IDS)
def test_configs(heads: int, config: PrefillConfig, causal: bool) -> None:
    case = make_case(heads, [40, 0, 17, 3], [21, 0, 17, 1], page_size=16, seed=heads + config.block_m)
    check_prefill(case, causal, config=config)


@pytest.mark.parametrize("causal", CAUSAL)
def test_bulk_copies_long_prefix(causal: bool) -> None:
    """tma=1 on sequences with many whole pages before the diagonal, split pages and NaN in unused slots."""
    case = make_case(16, [200, 64, 131], [37, 64, 5], page_size=32, seed=77)
    check_prefill(case, causal, config=PrefillConfig(block_m=2, block_h=16, block_n=32, tma=1))
    with pytest.raises(ValueError, match="tma"):
        PrefillConfig(block_n=64, tma=1).check_spec(MLASpec("prefill", 16, 512, 64, 32))


def test_strided_views_give_the_same_answer() -> None:
    fused = make_case(16, [0, 3, 40, 17], [0, 3, 6, 1], page_size=16, seed=60, fused=True)
    assert fused.kpe_cache.stride(1) == 576 and not fused.q_pe.is_contiguous()
    dense = fused.replace(**{k: getattr(fused, k).contiguous()
                             for k in ("q_nope", "q_pe", "ckv_cache", "kpe_cache")})
    for causal in (True, False):
        out_f, lse_f = fused.prefill(causal)
        out_d, lse_d = dense.prefill(causal)
        assert torch.equal(out_f, out_d) and torch.equal(lse_f, lse_d)
        assert_matches(out_f, lse_f, *dense.prefill_ref(causal))


@pytest.mark.parametrize("causal", CAUSAL)
def test_plan_run_equals_functional(causal: bool) -> None:
    case = make_case(16, [0, 5, 70, 33], [0, 5, 2, 10], page_size=16, seed=61)
    config = PrefillConfig(block_m=2, block_h=16, block_n=32)
    want = case.prefill(causal, config=config)
    plan = case.plan_prefill(causal, config=config)
    out, lse = plan.run(*case.queries())
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    fresh = case.with_query(seed=62)
    default = case.plan_prefill(causal)
    out, lse = poisoned_outputs(17, 16, 512, torch.float32)
    got = default.run(*fresh.queries(), out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert_matches(out, lse, *fresh.prefill_ref(causal))


def test_run_checks_rows_and_plan() -> None:
    case = make_case(16, [5, 9], [2, 3], page_size=1, seed=63)
    with pytest.raises(RuntimeError, match="plan"):
        MLAPrefill().run(*case.queries())
    plan = case.plan_prefill()
    with pytest.raises(ValueError, match="q_nope"):
        plan.run(case.q_nope[:4], case.q_pe[:4], case.ckv_cache, case.kpe_cache)


def test_validate_data_rejects_more_queries_than_tokens() -> None:
    case = make_case(16, [5, 3], [2, 4], page_size=1, seed=64)
    with pytest.raises(ValueError, match=r"^qo_indptr: .*q_len 4 > kv_len 3"):
        case.prefill(True, validate_data=True)
    with pytest.raises(ValueError, match="^qo_indptr"):
        case.plan_prefill(True)
    ok = make_case(16, [5, 3], [2, 3], page_size=1, seed=64)
    assert_matches(*ok.prefill(True, validate_data=True), *ok.prefill_ref(True))
