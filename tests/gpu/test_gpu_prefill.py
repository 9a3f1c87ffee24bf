"""Prefill (causal and non-causal) on a CUDA GPU in bf16: every catalogue specialization against the
float32 reference with the contract's tolerances (several thousand queries for one shape per
variant), CUDA graphs, a cache of more than 2^31 elements, fp16. Run: ``python -m pytest tests/gpu -n 8``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import TOLERANCES, Case, assert_matches, check_graph_replay, make_case, poisoned_outputs, skewed_lengths

from tuner import MLASpec, PrefillConfig, catalogue
from tuner.runtime.config import ws_capable
from tuner.runtime.loader import load_module

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
BIG_ELEMENTS = 1 << 31  # the ckv cache of the big-cache test holds more elements than this
LARGE_Q, SMALL_Q, SMALL_Q_WIDE = 4000, 600, 300  # queries per batch: large shapes, the rest, 64+ heads
MAX_PREFIX = 2000
SPECS = [s for s in catalogue() if not s.is_decode]
# The shapes that get the large batch (several thousand queries): one per variant, both page sizes.
LARGE = {MLASpec(v, 16, 512, 64, ps) for v in ("prefill_causal", "prefill") for ps in (1, 64)}


def batch_lengths(total_q: int, seed: int) -> tuple[list[int], list[int]]:
    """(kv_lens, q_lens): skewed query counts adding up to about ``total_q``, each after a prefix of 0 to
    MAX_PREFIX tokens, plus a sequence with no queries, one without tokens and a one-token prompt."""
    g = torch.Generator().manual_seed(seed)
    n = max(2, total_q // 400)
    raw = skewed_lengths(n, 16, 4096, seed=seed)
    q = [max(1, round(x * total_q / sum(raw))) for x in raw]
    kv = [a + int(b) for a, b in zip(q, torch.randint(0, MAX_PREFIX + 1, (n,), generator=g), strict=True)]
    q, kv = q + [0, 0, 1], kv + [300, 0, 1]
    order = torch.randperm(len(q), generator=g).tolist()
    return [kv[i] for i in order], [q[i] for i in order]


def realistic_case(spec: MLASpec, total_q: int, seed: int, dtype: torch.dtype | None = None) -> Case:
    kv, q = batch_lengths(total_q, seed)
    case = make_case(spec.num_heads, kv, q, page_size=spec.page_size, ckv=spec.head_dim_ckv,
                     kpe=spec.head_dim_kpe, dtype=dtype or DTYPE, device=DEVICE, seed=seed, spare_pages=64)
    return case.quantized() if spec.fp8 else case  # an fp8 spec: the same values over an fp8 cache


def run_and_check(case: Case, causal: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill into NaN-poisoned outputs (so every element must be written) and compare."""
    out, lse = poisoned_outputs(case.q_nope.shape[0], case.num_heads, case.q_nope.shape[2], case.q_nope.dtype,
                                DEVICE)
    case.prefill(causal, out=out, lse=lse, **kwargs)
    torch.cuda.synchronize()
    assert_matches(out, lse, *case.prefill_ref(causal), TOLERANCES[case.q_nope.dtype])
    return out, lse


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_catalogue_spec(spec: MLASpec) -> None:
    total_q = LARGE_Q if spec in LARGE else (SMALL_Q_WIDE if spec.num_heads >= 64 else SMALL_Q)
    case = realistic_case(spec, total_q, seed=100 + SPECS.index(spec))
    assert case.q_nope.shape[0] >= 0.9 * total_q
    run_and_check(case, spec.causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("page_size", [1, 64])
def test_fp16(page_size: int, causal: bool) -> None:
    spec = MLASpec("prefill_causal" if causal else "prefill", 16, 512, 64, page_size)
    run_and_check(realistic_case(spec, SMALL_Q, seed=200, dtype=torch.float16), causal)


CONFIGS = {
    "m1-n64-w4": PrefillConfig(block_m=1, block_h=16, block_n=64, num_warps=4, num_stages=2),
    "m2-n32-w4": PrefillConfig(block_m=2, block_h=16, block_n=32, num_warps=4, num_stages=1),
    "m4-n32-w8": PrefillConfig(block_m=4, block_h=16, block_n=32, num_warps=8, num_stages=2),
    "m8-h8-n32": PrefillConfig(block_m=8, block_h=8, block_n=32, num_warps=8, num_stages=1),
    "m4-n16-w8-tma": PrefillConfig(block_m=4, block_h=16, block_n=16, num_warps=8, num_stages=3, tma=1),
}


@pytest.mark.parametrize("config", [
    PrefillConfig(block_m=4, block_h=16, block_n=64, num_warps=8, num_stages=2, tma=1),
    PrefillConfig(block_m=2, block_h=16, block_n=32, num_warps=4, num_stages=3, tma=1),
], ids=lambda c: c.short())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_bulk_copy_configs(causal: bool, config: PrefillConfig) -> None:
    spec = MLASpec("prefill_causal" if causal else "prefill", 16, 512, 64, 64)
    run_and_check(realistic_case(spec, SMALL_Q, seed=310), causal, config=config)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_configs(causal: bool, config: PrefillConfig) -> None:
    spec = MLASpec("prefill_causal" if causal else "prefill", 16, 512, 64, 16)
    run_and_check(realistic_case(spec, SMALL_Q, seed=300), causal, config=config)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_cuda_graph_plan_run(causal: bool) -> None:
    spec = MLASpec("prefill_causal" if causal else "prefill", 16, 512, 64, 64)
    case = realistic_case(spec, SMALL_Q, seed=400)
    plan = case.plan_prefill(causal)
    out, lse = poisoned_outputs(case.q_nope.shape[0], 16, 512, DTYPE, DEVICE)
    reference = lambda: case.prefill_ref(causal)  # noqa: E731
    check_graph_replay(case, lambda: plan.run(*case.queries(), out=out, lse=lse),
                       lambda: plan.run(*case.queries()), reference)
    check_graph_replay(case, lambda: plan.run(*case.queries()), lambda: plan.run(*case.queries()), reference)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_cuda_graph_functional(causal: bool) -> None:
    spec = MLASpec("prefill_causal" if causal else "prefill", 64, 512, 64, 1)
    case = realistic_case(spec, SMALL_Q_WIDE, seed=401)
    check_graph_replay(case, lambda: case.prefill(causal), lambda: case.prefill(causal),
                       lambda: case.prefill_ref(causal))


@pytest.mark.parametrize("page_size", [1, 64])
def test_cache_past_2_31_elements(page_size: int) -> None:
    """As the decode test: the batch's pages at the top of a cache of more than 2^31 elements."""
    pages = BIG_ELEMENTS // (page_size * 512) + 64
    kv, q = [3000, 0, 1, 700, 64 * 40 + 5], [300, 0, 1, 700, 77]
    case = make_case(16, kv, q, page_size=page_size, dtype=DTYPE, device=DEVICE, seed=500, num_pages=pages,
                     top_pages=True)
    assert case.ckv_cache.numel() > BIG_ELEMENTS
    assert int(case.kv_indices.max()) * page_size * 512 >= BIG_ELEMENTS
    for causal in (True, False):
        run_and_check(case, causal)


@pytest.mark.parametrize("shape", [(64, 2), (64, 1), (32, 4), (16, 4)], ids=lambda s: "n{}-st{}".format(*s))
@pytest.mark.parametrize("spec", [MLASpec(v, h, 512, 64, ps) for v in ("prefill_causal", "prefill")
                                  for h, ps in ((16, 64), (128, 32), (8, 16), (16, 1), (128, 1), (64, 4))], ids=str)
def test_warp_specialized(spec: MLASpec, shape: tuple[int, int]) -> None:
    """The Gluon prefill (ws=1): tile sizes and stages, 8 / 16 / 128 heads (tiles of 8 tokens x 8 heads,
    4 x 16, 1 x 64), partial query tiles, rows that see nothing, NaN in unused slots; and it really runs."""
    block_n, stages = shape
    assert ws_capable(spec)
    case = realistic_case(spec, SMALL_Q_WIDE if spec.num_heads >= 64 else SMALL_Q, seed=400 + block_n + stages)
    assert load_module(spec)._ws_ready(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache)
    block_h = min(spec.num_heads, 64)
    config = PrefillConfig(block_m=64 // block_h, block_h=block_h, block_n=block_n, num_stages=stages,
                           tma=int(block_n <= spec.page_size), ws=1)
    run_and_check(case, spec.causal, config=config)
    if load_module(spec).ws_paged(block_n, 1):  # whole pages of 8+ tokens: also copied page by page
        run_and_check(case, spec.causal, config=replace(config, tma=1))
