"""An fp8 (float8_e4m3fn) KV cache on a CUDA GPU with bf16 queries: the kernels' tile, stage and bulk-copy
configs against the float32 reference over the dequantized cache, CUDA-graph capture with the scales as
device tensors (a changed scale followed by a replay), FlashMLA's fused 576-wide layout, speculative decoding,
and what fp8 costs against the bf16 cache it was quantized from (printed, for the notes). The catalogue's fp8
specs run in test_gpu_decode / test_gpu_prefill's catalogue tests. Run: ``python -m pytest tests/gpu -n 8``."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, assert_matches, check_graph_replay, make_case, poisoned_outputs, skewed_lengths

from tuner import DecodeConfig, MLASpec, PrefillConfig

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


def fp8_case(heads: int, page_size: int, batch: int, seed: int, q_lens=None, fused: bool = False) -> Case:
    kv = skewed_lengths(batch - 3, 300, 5000, seed=seed) + [0, 1, 7]
    if q_lens == "prefill":
        q_lens = [min(n, q) for n, q in zip(kv, [1, 17, 64, 300, 5] * batch, strict=False)]
    return make_case(heads, kv, q_lens, page_size=page_size, dtype=DTYPE, device=DEVICE, seed=seed,
                     spare_pages=64, fused=fused).quantized()


def run_and_check(case: Case, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = poisoned_outputs(len(case.kv_lens), case.num_heads, case.q_nope.shape[2], DTYPE, DEVICE)
    case.decode(out=out, lse=lse, **kwargs)
    assert_matches(out, lse, *case.decode_ref(), what="fp8 decode")
    return out, lse


DECODE_CONFIGS = {
    "n64-s2": DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=2),
    "n64-s4-tma": DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=4, tma=1),
    "n32-s3-tma-w8": DecodeConfig(block_h=16, block_n=32, num_warps=8, num_stages=3, tma=1, pdl=1),
    "n128-s3-tma-split": DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=3, tma=1, programs_per_sm=4,
                                      split_tokens=16),
}


@pytest.mark.parametrize("config", list(DECODE_CONFIGS.values()), ids=list(DECODE_CONFIGS))
@pytest.mark.parametrize("page_size", [1, 64])
def test_decode_configs(page_size: int, config: DecodeConfig) -> None:
    if config.tma and config.block_n > page_size:
        config = DecodeConfig(**{**config.to_dict(), "tma": 0})
    run_and_check(fp8_case(16, page_size, batch=24, seed=600 + page_size), config=config)


@pytest.mark.parametrize("heads", [64, 128])
def test_decode_many_heads(heads: int) -> None:
    config = DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=3, tma=1, merge_block_h=8,
                          merge_block_d=512)
    run_and_check(fp8_case(heads, 64, batch=12, seed=610 + heads), config=config)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("page_size", [1, 64])
def test_prefill_configs(page_size: int, causal: bool) -> None:
    case = fp8_case(16, page_size, batch=8, seed=620 + page_size, q_lens="prefill")
    ref = case.prefill_ref(causal=causal)
    for config in (PrefillConfig(block_m=4, block_h=16, block_n=64, num_stages=2, tma=int(page_size >= 64)),
                   PrefillConfig(block_m=8, block_h=16, block_n=32, num_stages=3, num_warps=8)):
        assert_matches(*case.prefill(causal=causal, config=config), *ref, what=f"fp8 prefill {config.short()}")


def test_fused_576_wide_cache() -> None:
    """FlashMLA's layout: one fp8 [P, 64, 576] cache, its column views as the two caches, one scale."""
    case = fp8_case(16, 64, batch=16, seed=630, fused=True)
    run_and_check(case, config=DecodeConfig(block_h=16, block_n=64, num_warps=4, num_stages=4, tma=1))
    run_and_check(case)


@pytest.mark.parametrize("page_size", [1, 64])
def test_cuda_graph_follows_tensor_scales(page_size: int) -> None:
    """plan/run captured with the scales as device tensors: new queries and a new scale value, replayed."""
    case = fp8_case(16, page_size, batch=16, seed=640 + page_size)
    scales = {"ckv_scale": torch.tensor([case.ckv_scale], device=DEVICE),
              "kpe_scale": torch.tensor([case.kpe_scale], device=DEVICE)}
    plan = case.plan_decode()
    check_graph_replay(case, lambda: plan.run(*case.queries(), **scales), lambda: plan.run(*case.queries(), **scales),
                       case.decode_ref)
    graph = torch.cuda.CUDAGraph()
    out, lse = poisoned_outputs(16, 16, 512, DTYPE, DEVICE)
    plan.run(*case.queries(), out=out, lse=lse, **scales)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        plan.run(*case.queries(), out=out, lse=lse, **scales)
    scales["ckv_scale"].mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, lse, *case.replace(ckv_scale=case.ckv_scale * 0.5).decode_ref(), what="halved scale")


@pytest.mark.parametrize("s_q", [2, 4])
def test_speculative_decoding(s_q: int) -> None:
    kv = [max(s_q, n) for n in skewed_lengths(14, 300, 5000, seed=s_q)] + [s_q, s_q + 1]
    case = make_case(128, kv, [s_q] * len(kv), page_size=64, dtype=DTYPE, device=DEVICE, seed=650 + s_q,
                     spare_pages=16).quantized()
    batch = len(kv)
    q_nope, q_pe = (q.view(batch, s_q, *q.shape[1:]) for q in (case.q_nope, case.q_pe))
    plan = case.plan_decode(q_len=s_q)
    out, lse = plan.run(q_nope, q_pe, case.ckv_cache, case.kpe_cache, **case.scales)
    assert_matches(out.flatten(0, 1), lse.flatten(0, 1), *case.prefill_ref(causal=True), what="fp8 4-D")


def test_error_against_the_bf16_cache() -> None:
    """What fp8 costs: our fp8 result against the float32 reference over the bf16 cache it was quantized from
    (not a pass/fail rule beyond sanity; the numbers go into the notes)."""
    wide = make_case(16, skewed_lengths(29, 300, 5000, seed=660) + [0, 1, 7], page_size=64, dtype=DTYPE,
                     device=DEVICE, seed=660, spare_pages=64)
    case = wide.quantized()
    out, lse = case.decode()
    ref_out, ref_lse = wide.decode_ref()
    dq_out, dq_lse = case.decode_ref()
    live = ~torch.isinf(ref_lse)
    err = (out.float() - ref_out).abs().max().item()
    rel = ((out.float() - ref_out).norm() / ref_out.norm()).item()
    lse_err = (lse - ref_lse)[live].abs().max().item()
    own = (out.float() - dq_out).abs().max().item()
    print(f"\nfp8 vs the bf16 cache: max |out| error {err:.4f}, relative Frobenius {rel:.4f}, max |lse| error "
          f"{lse_err:.4f}; vs the dequantized reference: max |out| error {own:.4f}")
    assert rel < 0.1 and lse_err < 0.5


def test_spec_of_the_call() -> None:
    case = fp8_case(16, 64, batch=4, seed=670)
    assert case.plan_decode().spec == MLASpec("decode", 16, 512, 64, 64, True)
