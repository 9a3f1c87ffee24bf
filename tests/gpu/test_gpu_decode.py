"""Decode on a CUDA GPU in bf16: every catalogue specialization at realistic sizes against the
float32 reference with the contract's tolerances, CUDA-graph capture and replay, a cache of more
than 2^31 elements, fp16. Run: ``python -m pytest tests/gpu -n 8``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import TOLERANCES, Case, assert_matches, check_graph_replay, make_case, poisoned_outputs, skewed_lengths

from tuner import DecodeConfig, MLASpec, catalogue
from tuner.runtime.config import default_decode_config, ws_block_h, ws_capable, ws_narrow
from tuner.runtime.loader import load_module

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
KV_RANGE = (500, 5000)  # realistic, skewed kv lengths
EDGE_LENGTHS = [0, 1, 7]  # an empty sequence and short ones (partial first pages) in every batch
BIG_ELEMENTS = 1 << 31  # the ckv cache of the big-cache test holds more elements than this
SPECS = [s for s in catalogue() if s.is_decode]


def realistic_case(spec: MLASpec, batch: int, seed: int, dtype: torch.dtype | None = None) -> Case:
    kv = skewed_lengths(batch - len(EDGE_LENGTHS), *KV_RANGE, seed=seed) + EDGE_LENGTHS
    kv = [kv[i] for i in torch.randperm(len(kv), generator=torch.Generator().manual_seed(seed)).tolist()]
    case = make_case(spec.num_heads, kv, page_size=spec.page_size, ckv=spec.head_dim_ckv,
                     kpe=spec.head_dim_kpe, dtype=dtype or DTYPE, device=DEVICE, seed=seed, spare_pages=64)
    return case.quantized() if spec.fp8 else case  # an fp8 spec: the same values over an fp8 cache


def run_and_check(case: Case, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode into NaN-poisoned outputs (so every element must be written) and compare."""
    out, lse = poisoned_outputs(len(case.kv_lens), case.num_heads, case.q_nope.shape[2], case.q_nope.dtype,
                                DEVICE)
    case.decode(out=out, lse=lse, **kwargs)
    torch.cuda.synchronize()
    assert_matches(out, lse, *case.decode_ref(), TOLERANCES[case.q_nope.dtype])
    return out, lse


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_catalogue_spec(spec: MLASpec) -> None:
    index = SPECS.index(spec)
    run_and_check(realistic_case(spec, batch=(8, 16, 32)[index % 3], seed=100 + index))


@pytest.mark.parametrize("spec", [MLASpec("decode", 16, 512, 64, 1), MLASpec("decode", 64, 512, 64, 64)],
                         ids=str)
def test_fp16(spec: MLASpec) -> None:
    run_and_check(realistic_case(spec, batch=16, seed=200, dtype=torch.float16))


CONFIGS = {
    "bn32-w4-s2": DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=2),
    "bn64-w4-s2": DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2),
    "many-splits": DecodeConfig(block_h=16, block_n=64, programs_per_sm=4, split_tokens=16),
    "one-split": DecodeConfig(block_h=16, block_n=64, programs_per_sm=1, split_tokens=1 << 24),
    "merge-wide": DecodeConfig(block_h=16, merge_block_h=16, merge_block_d=512, merge_num_warps=8),
    # stage 2 as a programmatic dependent launch, with many pieces to merge per request
    "pdl-many-splits": DecodeConfig(block_h=16, block_n=64, programs_per_sm=4, split_tokens=16, pdl=1),
    "pdl-merge-wide": DecodeConfig(block_h=16, merge_block_h=32, merge_block_d=512, merge_num_warps=8, pdl=1),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("page_size", [1, 64])
def test_configs(page_size: int, config: DecodeConfig) -> None:
    run_and_check(realistic_case(MLASpec("decode", 16, 512, 64, page_size), batch=24, seed=300), config=config)


@pytest.mark.parametrize("config", [
    DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=3, tma=1),
    DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=4, tma=1, programs_per_sm=2),
    DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=3, tma=1, split_tokens=16, programs_per_sm=4),
], ids=lambda c: c.short())
@pytest.mark.parametrize("heads", [16, 128])
def test_bulk_copy_configs(heads: int, config: DecodeConfig) -> None:
    if heads == 128:
        config = DecodeConfig(**{**config.to_dict(), "block_h": 64, "num_warps": 8,
                                 "block_n": min(config.block_n, 32)})  # 64 KV rows x 64 heads: too much smem
    run_and_check(realistic_case(MLASpec("decode", heads, 512, 64, 64), batch=24, seed=310), config=config)


WS_CONFIGS = [  # (block_n, num_stages, programs_per_sm, split_tokens)
    (64, 2, 1, 64), (64, 1, 1, 64), (32, 4, 1, 64), (32, 3, 4, 16), (16, 4, 2, 16), (64, 2, 1, 1 << 24),
]


@pytest.mark.parametrize("shape", WS_CONFIGS, ids=lambda s: "n{}-st{}-p{}-s{}".format(*s))
@pytest.mark.parametrize("spec", [s for s in SPECS if ws_capable(s)], ids=str)
def test_warp_specialized_stage1(spec: MLASpec, shape: tuple[int, int, int, int]) -> None:
    """The Gluon stage 1 (ws=1) on every capable spec: tile sizes, stage counts, many and no splits,
    empty and short sequences, NaN in unused slots; and it really runs (no silent fallback). All but the
    first shape launch stage 2 as a programmatic dependent (pdl=1)."""
    block_n, stages, per_sm, split = shape
    if ws_narrow(spec) and block_n != 64:
        pytest.skip("below 64 heads the warp-specialized stage 1 takes 64-token tiles")
    case = realistic_case(spec, batch=12, seed=320 + block_n + stages)
    assert load_module(spec)._ws_ready(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache)
    config = DecodeConfig(block_h=ws_block_h(spec), block_n=block_n, num_stages=stages, programs_per_sm=per_sm,
                          split_tokens=split, ws=1, tma=int(block_n <= spec.page_size),
                          pdl=int(shape != WS_CONFIGS[0]))
    run_and_check(case, config=config)


PAGED_SPECS = [s for s in SPECS if ws_capable(s) and not s.fp8 and s.page_size in (16, 32)]


@pytest.mark.parametrize("block_n", [64, 32])
@pytest.mark.parametrize("spec", PAGED_SPECS, ids=str)
def test_paged_bulk_loader(spec: MLASpec, block_n: int) -> None:
    """The warp-specialized stage 1 with tiles of whole pages copied page by page by bulk copies (tma=1,
    block_n > page_size): last tiles with fewer pages than the tile (copied from the tile's first page
    instead), NaN in unused slots, requests cut into several shares."""
    if block_n <= spec.page_size or (ws_narrow(spec) and block_n != 64):
        pytest.skip("a tile of one page is the plain bulk copy; below 64 heads the tiles are 64 tokens")
    module = load_module(spec)
    assert module.ws_paged(block_n, 1)
    case = realistic_case(spec, batch=12, seed=340 + block_n)
    assert module._ws_ready(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache)
    config = DecodeConfig(block_h=ws_block_h(spec), block_n=block_n, num_stages=2 if block_n == 64 else 4,
                          programs_per_sm=1, split_tokens=64, ws=1, tma=1, pdl=1)
    run_and_check(case, config=config)


def test_warp_specialized_fp16_and_fallback() -> None:
    """fp16 runs the Gluon kernel too; q rows that are not one row array (a view of a padded batch) fall
    back to the Triton stage 1 with the same config, and give the same answer."""
    spec = MLASpec("decode", 128, 512, 64, 64)
    config = DecodeConfig(block_h=64, block_n=64, num_stages=2, ws=1, tma=1)
    run_and_check(realistic_case(spec, batch=10, seed=330, dtype=torch.float16), config=config)
    case = realistic_case(spec, batch=10, seed=331)
    padded = torch.zeros(10, 129, 512, dtype=DTYPE, device=DEVICE)  # requests 129 heads apart: no row array
    padded[:, :128] = case.q_nope
    case = case.replace(q_nope=padded[:, :128])
    assert not load_module(spec)._ws_ready(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache)
    run_and_check(case, config=config)


def test_config_128_heads() -> None:
    config = DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=1)
    run_and_check(realistic_case(MLASpec("decode", 128, 512, 64, 16), batch=8, seed=301), config=config)


@pytest.mark.parametrize("pdl", [0, 1])
@pytest.mark.parametrize("page_size", [1, 64])
def test_cuda_graph_plan_run(page_size: int, pdl: int) -> None:
    spec = MLASpec("decode", 16, 512, 64, page_size)
    case = realistic_case(spec, batch=16, seed=400 + pdl)
    config = replace(default_decode_config(spec, 16, 1024, torch.cuda.get_device_properties(0).multi_processor_count),
                     pdl=pdl, programs_per_sm=2, split_tokens=64)  # many requests span shares
    plan = case.plan_decode(config=config)
    out, lse = poisoned_outputs(16, 16, 512, DTYPE, DEVICE)
    check_graph_replay(case, lambda: plan.run(*case.queries(), out=out, lse=lse),
                       lambda: plan.run(*case.queries()), case.decode_ref)
    check_graph_replay(case, lambda: plan.run(*case.queries()), lambda: plan.run(*case.queries()),
                       case.decode_ref)


@pytest.mark.parametrize("page_size", [1, 64])
def test_cuda_graph_functional(page_size: int) -> None:
    case = realistic_case(MLASpec("decode", 128, 512, 64, page_size), batch=8, seed=401)
    check_graph_replay(case, case.decode, case.decode, case.decode_ref)


@pytest.mark.parametrize("page_size", [1, 64])
def test_cache_past_2_31_elements(page_size: int) -> None:
    """ckv_cache [P, page_size, 512] with P * page_size * 512 > 2^31 and the batch's pages at the top
    of the cache: page offsets must be computed in 64 bits. Pages no sequence uses are NaN."""
    pages = BIG_ELEMENTS // (page_size * 512) + 64
    kv = [3000, 0, 1, 700, 64 * 40 + 5]
    case = make_case(16, kv, page_size=page_size, dtype=DTYPE, device=DEVICE, seed=500, num_pages=pages,
                     top_pages=True)
    assert case.ckv_cache.numel() > BIG_ELEMENTS
    assert int(case.kv_indices.max()) * page_size * 512 >= BIG_ELEMENTS
    run_and_check(case)
