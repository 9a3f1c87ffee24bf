"""Decode kernels under the Triton interpreter against the float32 reference: every edge case of
``docs/contract.md`` at small sizes, several launch configs, and the plan/run API."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_matches, make_case, poisoned_outputs

from tuner import DecodeConfig, MLADecode, MLASpec, catalogue, mla_decode
from tuner.runtime import loader
from tuner.runtime.device import gpu_info

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def lengths(page_size: int, full_pages: bool) -> list[int]:
    """An empty sequence, one token, partial and whole pages; whole pages only with ``full_pages``."""
    if full_pages:
        return [page_size * n for n in (0, 1, 3, 2)] + [page_size * 5]
    return [0, 1, 37, 2 * page_size + 3, 90, page_size]


def check_decode(case, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run decode into NaN-poisoned outputs and compare with the reference."""
    out, lse = poisoned_outputs(len(case.kv_lens), case.num_heads, case.q_nope.shape[2], case.q_nope.dtype)
    got_out, got_lse = case.decode(out=out, lse=lse, **kwargs)
    assert got_out is out and got_lse is lse, "out=/lse= must be written in place and returned"
    assert_matches(out, lse, *case.decode_ref())
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last_page_len", [True, False], ids=["last_page_len", "full_pages"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [8, 16])
def test_matches_reference(heads: int, page_size: int, last_page_len: bool, dtype: torch.dtype) -> None:
    kv = lengths(page_size, full_pages=not last_page_len)
    case = make_case(heads, kv, page_size=page_size, dtype=dtype, seed=heads + page_size,
                     last_page_len=last_page_len, spare_pages=4)
    out, lse = check_decode(case)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all()), "empty sequence"


@pytest.mark.parametrize("page_size", [1, 16])
def test_heads_128(page_size: int) -> None:
    check_decode(make_case(128, [3, 0, 21], page_size=page_size, dtype=torch.float16, seed=5))


@pytest.mark.parametrize("page_size", [1, 64])
def test_small_head_dims(page_size: int) -> None:
    """The catalogue's ckv 256 / kpe 32 shape: the templates are not hard-wired to 512/64."""
    check_decode(make_case(16, [0, 5, 70, 129], page_size=page_size, ckv=256, kpe=32, seed=6))


def test_head_count_outside_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """24 heads: no module in generated/, so the loader renders one on demand into the cache folder."""
    monkeypatch.setenv("MLA_TUNER_CACHE_DIR", str(tmp_path))
    spec = MLASpec("decode", 24, 512, 64, 16)
    assert spec not in catalogue()
    path = loader.module_path(spec)  # cache/generated/<hash of the templates>/<name>.py
    assert path.name == f"{spec.name()}.py" and path.parent.parent == tmp_path / "generated"
    assert path.parent.name == loader._templates_hash()
    case = make_case(24, [0, 17, 40, 3], page_size=16, seed=7)
    check_decode(case)
    check_decode(case, config=DecodeConfig(block_h=16, block_n=16, programs_per_sm=64, split_tokens=16))


def test_all_sequences_empty() -> None:
    case = make_case(16, [0, 0, 0], page_size=16, seed=8)
    assert case.kv_indices.numel() == 0
    out, lse = check_decode(case)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_batch_of_zero() -> None:
    case = make_case(16, [], page_size=16, seed=9)
    out, lse = case.decode()
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)
    out, lse = case.plan_decode().run(*case.queries())
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)


CONFIGS = {
    "one-split": DecodeConfig(block_h=16, block_n=32, programs_per_sm=1, split_tokens=1 << 20),
    "many-splits": DecodeConfig(block_h=16, block_n=16, programs_per_sm=64, split_tokens=16),
    "splits-past-tokens": DecodeConfig(block_h=16, block_n=16, programs_per_sm=64, split_tokens=1),
    "merge-tiles": DecodeConfig(block_h=16, block_n=64, programs_per_sm=8, split_tokens=16,
                                merge_block_h=32, merge_block_d=512, merge_num_warps=8),
    "merge-narrow": DecodeConfig(block_h=16, block_n=32, programs_per_sm=8, split_tokens=8,
                                 merge_block_h=16, merge_block_d=64),
}


def test_configs_cover_every_merge_step() -> None:
    """Stage 2 folds 1, 2 or 4 pieces per step (merge_pieces, by the merge tile's registers): the
    configs below run each, with requests in more pieces than a step holds."""
    module = loader.load_module(MLASpec("decode", 16, 512, 64, 1))
    steps = {module.merge_pieces(c.merge_block_h, c.merge_block_d, c.merge_num_warps) for c in CONFIGS.values()}
    assert steps == {1, 2, 4}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("page_size", [1, 16])
def test_configs(config: DecodeConfig, page_size: int) -> None:
    case = make_case(16, [0, 1, 37, 90, 5, 16], page_size=page_size, seed=10 + page_size)
    check_decode(case, config=config)


@pytest.mark.parametrize("page_size,block_n", [(16, 16), (64, 16), (64, 32), (64, 64)])
def test_bulk_copies(page_size: int, block_n: int) -> None:
    """tma=1: whole tiles by tensor descriptors, the partial last tile by the gather; poisoned unused
    slots (NaN) and split requests included. A cache view whose strides are not 16-byte multiples
    falls back to the gather with the same answer."""
    config = DecodeConfig(block_n=block_n, tma=1, programs_per_sm=1, split_tokens=32)
    case = make_case(16, [0, 1, 37, 90, 5, 16, 130], page_size=page_size, seed=60 + page_size + block_n)
    check_decode(case, config=config)
    odd = torch.zeros(*case.ckv_cache.shape[:2], 512 + 3, dtype=case.ckv_cache.dtype)[..., :512]
    odd.copy_(case.ckv_cache)  # token stride 515 elements: no descriptor, the gather runs
    case.ckv_cache = odd
    check_decode(case, config=config)


def test_bulk_copies_need_a_tile_inside_a_page() -> None:
    with pytest.raises(ValueError, match="tma"):
        DecodeConfig(block_n=64, tma=1).check_spec(MLASpec("decode", 16, 512, 64, 16))
    with pytest.raises(ValueError, match="tma"):
        DecodeConfig(block_n=64, tma=2)


def test_more_splits_than_tokens_is_exact() -> None:
    """Shares of one token (page_size 1) and, with 64-token pages, more shares than pages: empty
    shares write nothing and the merge skips them."""
    config = CONFIGS["splits-past-tokens"]
    for page_size, kv in ((1, [1, 2, 9, 0, 3]), (64, [1, 70, 0, 5])):
        case = make_case(16, kv, page_size=page_size, seed=20 + page_size)
        spec = MLASpec("decode", 16, 512, 64, page_size)
        splits = config.num_programs(spec, gpu_info(torch.device("cpu")).num_sms,
                                     case.kv_indices.numel() * page_size, len(kv))
        # page_size 1: more shares than any sequence has tokens; 64: more shares than pages in all
        assert splits > (max(kv) if page_size == 1 else case.kv_indices.numel())
        check_decode(case, config=config)


@pytest.mark.parametrize("programs_per_sm", [1, 2, 3, 5, 8])
def test_empty_requests_at_share_boundaries_and_ends(programs_per_sm: int) -> None:
    """Requests without pages first, last, in runs, and wherever a share boundary falls (every share
    count from 4 to 32 over 40 one-token pages): each gets output 0 and lse -inf, the rest are exact."""
    kv = [0, 0, 3, 0, 5, 0, 0, 2, 0, 10, 0, 20, 0, 0]
    case = make_case(16, kv, page_size=1, seed=50 + programs_per_sm)
    config = DecodeConfig(block_n=16, programs_per_sm=programs_per_sm, split_tokens=1, merge_block_h=4)
    spec = MLASpec("decode", 16, 512, 64, 1)
    assert config.num_programs(spec, gpu_info(torch.device("cpu")).num_sms, sum(kv), len(kv)) == 4 * programs_per_sm
    out, lse = check_decode(case, config=config)
    empty = [i for i, n in enumerate(kv) if n == 0]
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())


def test_aligned_shares() -> None:
    """align rounds the shares down by at most 1/16 to a multiple or divisor of the batch; never up."""
    def n(batch: int, sms: int = 132, align: int = 1, heads: int = 16, block_h: int = 16) -> int:
        config = DecodeConfig(block_h=block_h, split_tokens=64, align=align)
        return config.num_programs(MLASpec("decode", heads, 512, 64, 64), sms, 1 << 30, batch)
    assert [n(b) for b in (1, 16, 32, 64, 128, 132, 200, 256, 260, 100, 17)] == \
        [132, 128, 128, 128, 128, 132, 132, 128, 130, 132, 132]
    assert n(128, align=0) == 132 and n(32, heads=128, block_h=64) == 64  # 66 shares of two head groups
    assert n(16, sms=8) == 8 and n(3, sms=8) == 8 and n(5, sms=8) == 8  # below 16 shares: no slack
    # the warp-specialized stage 1 fills a multiprocessor: one program per SM, never waves
    ws = DecodeConfig(block_h=16, split_tokens=64, programs_per_sm=4, ws=1, align=0)
    assert ws.num_programs(MLASpec("decode", 16, 512, 64, 64), 132, 1 << 30, 16) == 132
    assert ws.num_programs(MLASpec("decode", 16, 512, 64, 64), 132, 1024, 1) == 16  # split_tokens still bounds it
    assert replace(ws, ws=0).num_programs(MLASpec("decode", 16, 512, 64, 64), 132, 1 << 30, 16) == 528
    # a table entry written before align existed keeps its old behaviour
    assert DecodeConfig.from_dict({k: v for k, v in DecodeConfig(align=1).to_dict().items() if k != "align"}).align == 0


@pytest.mark.parametrize(("kv", "programs_per_sm"),
                         [([70] * 6, 8), ([64, 0, 64, 64, 0, 64], 8), ([9, 200, 3, 50, 1, 1, 40], 9)])
def test_aligned_shares_are_exact(kv: list[int], programs_per_sm: int) -> None:
    """Aligned shares (whole requests, equal pieces, and unequal requests where alignment buys nothing)
    give the reference result; with equal requests no request spans two shares."""
    case = make_case(16, kv, page_size=1, seed=sum(kv) + programs_per_sm)
    spec = MLASpec("decode", 16, 512, 64, 1)
    config = DecodeConfig(block_n=16, programs_per_sm=programs_per_sm, split_tokens=1, merge_block_h=4, align=1)
    sms = gpu_info(torch.device("cpu")).num_sms
    shares = config.num_programs(spec, sms, sum(kv), len(kv))
    assert shares < replace(config, align=0).num_programs(spec, sms, sum(kv), len(kv))
    check_decode(case, config=config)
    if len(set(kv)) == 1:  # every request starts where a share starts (the generated _share_start)
        starts = {sum(kv) * p // shares for p in range(shares + 1)}
        assert {i * kv[0] for i in range(len(kv) + 1)} <= starts


@pytest.mark.parametrize(("heads", "block_h"), [(32, 16), (32, 32), (24, 32), (64, 64)])
def test_block_h(heads: int, block_h: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLA_TUNER_CACHE_DIR", str(tmp_path))  # 24 heads renders on demand
    case = make_case(heads, [5, 0, 40], page_size=16, seed=heads + block_h)
    check_decode(case, config=DecodeConfig(block_h=block_h, block_n=16, programs_per_sm=4, split_tokens=16))


def test_strided_views_give_the_same_answer() -> None:
    """ckv/kpe caches as [..., :512] / [..., 512:] of one 576-wide cache, q likewise."""
    fused = make_case(16, [0, 3, 40, 17], page_size=16, seed=30, fused=True)
    assert fused.ckv_cache.stride(1) == 576 and not fused.q_nope.is_contiguous()
    dense = fused.replace(**{k: getattr(fused, k).contiguous()
                             for k in ("q_nope", "q_pe", "ckv_cache", "kpe_cache")})
    out_f, lse_f = fused.decode()
    out_d, lse_d = dense.decode()
    assert torch.equal(out_f, out_d) and torch.equal(lse_f, lse_d)
    assert_matches(out_f, lse_f, *dense.decode_ref())


def test_strided_outputs() -> None:
    """out/lse may be views with padded strides: only their own elements are written."""
    case = make_case(16, [4, 0, 33], page_size=1, seed=31)
    out_buf = torch.full((3, 16, 640), 7.0)
    lse_buf = torch.full((3, 20), 7.0)
    out, lse = out_buf[:, :, :512], lse_buf[:, :16]
    case.decode(out=out, lse=lse)
    assert_matches(out, lse, *case.decode_ref())
    assert bool((out_buf[:, :, 512:] == 7.0).all()) and bool((lse_buf[:, 16:] == 7.0).all())


def test_plan_run_equals_functional() -> None:
    case = make_case(16, [0, 5, 70, 33], page_size=16, seed=40)
    config = CONFIGS["many-splits"]
    want_out, want_lse = case.decode(config=config)
    plan = case.plan_decode(config=config)
    out, lse = plan.run(*case.queries())
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    # a second run on new queries reuses the plan; the default config also matches the reference
    fresh = case.with_query(seed=41)
    default = case.plan_decode()
    assert default.config is not None
    out, lse = poisoned_outputs(4, 16, 512, torch.float32)
    got = default.run(*fresh.queries(), out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert_matches(out, lse, *fresh.decode_ref())
    out2, lse2 = plan.run(*fresh.queries())
    assert_matches(out2, lse2, *fresh.decode_ref())


def test_run_before_plan() -> None:
    case = make_case(16, [3], page_size=1, seed=42)
    with pytest.raises(RuntimeError, match="plan"):
        MLADecode().run(*case.queries())


def test_functional_positional_order() -> None:
    """mla_decode's positional order is FlashInfer-Bench's: (..., sm_scale, kv_last_page_len)."""
    case = make_case(16, [5, 20], page_size=16, seed=43)
    out, lse = mla_decode(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, case.kv_indptr,
                          case.kv_indices, case.sm_scale, case.kv_last_page_len)
    assert_matches(out, lse, *case.decode_ref())
    assert out.dtype == case.q_nope.dtype and lse.dtype == torch.float32


@triton.jit
def _find_each(find, kv_indptr_ptr, batch, pages_ptr, out_ptr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, find(kv_indptr_ptr, batch, tl.load(pages_ptr + i)))


@pytest.mark.parametrize("batch", [1, 2, 127, 128, 129, 300, 16385, 40000])
def test_find_request_is_the_last_request_starting_at_or_before_a_page(batch: int) -> None:
    """The request search (one vector load per level of a 128-ary search) against searchsorted, on
    batches of one, two and three levels with runs of empty requests (repeated kv_indptr entries)."""
    g = torch.Generator().manual_seed(batch)
    sizes = torch.randint(0, 4, (batch,), generator=g) * (torch.rand(batch, generator=g) < 0.7)
    sizes[-1] += 1  # at least one page
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(torch.int32)
    total = int(indptr[-1])
    pages = torch.unique(torch.cat([torch.randint(0, total, (200,), generator=g), torch.tensor([0, total - 1]),
                                    indptr[:-1].clamp(max=total - 1)]))[:400].to(torch.int32)
    expected = torch.searchsorted(indptr[:batch], pages, right=True) - 1  # the last b with indptr[b] <= page
    found = torch.full_like(pages, -1)
    find = loader.load_module(MLASpec("decode", 16, 512, 64, 1))._find_request
    _find_each[(pages.numel(),)](find, indptr, batch, pages, found)
    assert torch.equal(found, expected.to(torch.int32))
