"""An fp8 (float8_e4m3fn) KV cache with per-tensor scales, under the Triton interpreter: every API form
(one call, plan/run, the 4-D decode of several queries per request, prefill causal and not) against the
float32 reference over the dequantized cache (``fp8 * scale``), the scales as floats and as device tensors
(a changed tensor value followed by a replayed launch), and the bad inputs of the contract's fp8 section.

The interpreter loads float8_e4m3fn and converts it; the queries are fp16 or float32 here (bf16 products
run on the GPU: tests/gpu)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_matches, make_case

import tuner
from tuner import DecodeConfig, MLADecode, PrefillConfig
from tuner.runtime import ops
from tuner.runtime.spec import MLASpec

FP8 = torch.float8_e4m3fn
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


def lengths(page_size: int) -> list[int]:
    """An empty request, one token, partial last pages, a page boundary, several pages."""
    return [0, 1, 37, 2 * page_size + 3, 90, 4 * page_size]


def fp8_case(heads: int = 16, page_size: int = 16, dtype: torch.dtype = torch.float16, q_lens=None, seed: int = 0,
             **kwargs):
    kv = lengths(page_size)
    if q_lens == "all":
        q_lens = [min(n, 3) for n in kv]
    return make_case(heads, kv, q_lens, page_size=page_size, dtype=dtype, seed=seed, **kwargs).quantized()


def test_spec_names() -> None:
    spec = MLASpec("decode", 16, 512, 64, 64, True)
    assert spec.name() == "mla_paged_decode_h16_ckv512_kpe64_ps64_fp8e4m3"
    assert MLASpec.from_name(spec.name()) == spec
    assert MLASpec.from_name("mla_paged_decode_h16_ckv512_kpe64_ps64").fp8 is False
    assert spec in tuner.catalogue() and MLASpec("prefill_causal", 128, 512, 64, 1, True) in tuner.catalogue()


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_dequantized_reference(page_size: int, dtype: torch.dtype) -> None:
    case = fp8_case(page_size=page_size, dtype=dtype, seed=page_size)
    out, lse = case.decode()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_matches(out, lse, *case.decode_ref(), what="fp8 decode")
    assert torch.equal(lse[0], torch.full_like(lse[0], float("-inf"))) and not out[0].any()


@pytest.mark.parametrize("programs_per_sm,split_tokens", [(1, 1024), (8, 16)], ids=["whole", "split"])
def test_decode_splits_and_tensor_scales(programs_per_sm: int, split_tokens: int) -> None:
    """More shares than tokens (pieces merged by stage 2) and fewer; the scales as one-element tensors."""
    case = fp8_case(seed=3)
    config = DecodeConfig(block_h=16, block_n=16, programs_per_sm=programs_per_sm, split_tokens=split_tokens,
                          num_warps=4, num_stages=2, merge_block_h=16, merge_block_d=128)
    ref = case.decode_ref()
    tensors = {"ckv_scale": torch.tensor([case.ckv_scale]), "kpe_scale": torch.tensor(case.kpe_scale)}
    assert_matches(*case.decode(config=config, **tensors), *ref, what="tensor scales")
    mixed = {"ckv_scale": case.ckv_scale, "kpe_scale": tensors["kpe_scale"]}
    assert_matches(*case.decode(config=config, **mixed), *ref, what="a float and a tensor")


def test_scales_are_applied() -> None:
    """Other scales give the reference of the other dequantized cache (not a no-op), and the fp8 result is the
    16-bit kernel's over the dequantized cache up to the products' rounding."""
    case = fp8_case(seed=5)
    other = case.replace(ckv_scale=case.ckv_scale * 0.5, kpe_scale=case.kpe_scale * 3.0)
    out, lse = other.decode()
    assert_matches(out, lse, *other.decode_ref(), what="other scales")
    assert not torch.allclose(lse[1:], case.decode_ref()[1][1:], atol=1e-2)
    wide = case.replace(ckv_cache=case.ckv_cache.float() * case.ckv_scale, kpe_cache=case.kpe_cache.float()
                        * case.kpe_scale, ckv_scale=None, kpe_scale=None,
                        q_nope=case.q_nope.float(), q_pe=case.q_pe.float())
    out16, lse16 = wide.decode()
    out8, lse8 = case.replace(q_nope=case.q_nope.float(), q_pe=case.q_pe.float()).decode()
    torch.testing.assert_close(out8, out16, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse8, lse16, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill(causal: bool, page_size: int) -> None:
    case = fp8_case(page_size=page_size, q_lens="all", seed=7)
    assert_matches(*case.prefill(causal=causal), *case.prefill_ref(causal=causal), what="fp8 prefill")
    plan = case.plan_prefill(causal=causal)
    assert plan.spec.fp8 and plan.spec.name().endswith("_fp8e4m3")
    ref = case.prefill_ref(causal=causal)
    for _ in range(2):  # the first run records, the second replays
        assert_matches(*plan.run(*case.queries(), **case.scales), *ref, what="fp8 prefill plan/run")


def test_plan_run_replays_with_new_scales() -> None:
    """plan(kv_dtype=fp8); run() with float scales (a new value: a new recording, the right answer) and with a
    tensor whose value changes in place between replays (the kernel reads it on the device)."""
    case = fp8_case(seed=11)
    plan = case.plan_decode()
    assert plan.spec == MLASpec("decode", 16, 512, 64, 16, True)
    assert_matches(*plan.run(*case.queries(), **case.scales), *case.decode_ref(), what="run 1")
    assert_matches(*plan.run(*case.queries(), **case.scales), *case.decode_ref(), what="run 2 (replay)")
    half = case.replace(ckv_scale=case.ckv_scale / 2)
    assert_matches(*plan.run(*case.queries(), **half.scales), *half.decode_ref(), what="a new float scale")
    scale = torch.tensor([case.ckv_scale])
    kpe = torch.tensor([case.kpe_scale])
    for factor in (1.0, 0.25, 2.0):
        scale.fill_(case.ckv_scale * factor)
        now = case.replace(ckv_scale=case.ckv_scale * factor)
        assert_matches(*plan.run(*case.queries(), ckv_scale=scale, kpe_scale=kpe), *now.decode_ref(),
                       what=f"tensor scale x{factor}")


@pytest.mark.parametrize("s_q", [2, 4])
def test_decode_several_queries_per_request(s_q: int) -> None:
    kv = [s_q, 37, 35, 90]
    case = make_case(16, kv, [s_q] * len(kv), page_size=16, dtype=torch.float16, seed=s_q).quantized()
    batch = len(kv)
    q_nope, q_pe = (q.view(batch, s_q, *q.shape[1:]) for q in (case.q_nope, case.q_pe))
    out, lse = tuner.mla_decode(q_nope, q_pe, case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices,
                                case.sm_scale, case.kv_last_page_len, **case.scales)
    ref_out, ref_lse = case.prefill_ref(causal=True)
    assert_matches(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse, what="4-D fp8")
    plan = case.plan_decode(q_len=s_q)
    assert plan.spec == MLASpec("decode", 16 * s_q, 512, 64, 16, True), "packed in the fp8 decode kernel"
    out, lse = plan.run(q_nope, q_pe, case.ckv_cache, case.kpe_cache, **case.scales)
    assert_matches(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse, what="4-D fp8 plan/run")


def test_fused_cache_shares_one_scale() -> None:
    """A 576-wide fp8 cache whose two column views are ckv and kpe (FlashMLA's layout), one scale."""
    case = make_case(16, lengths(16), page_size=16, dtype=torch.float16, seed=13, fused=True).quantized()
    assert case.ckv_cache.untyped_storage().data_ptr() == case.kpe_cache.untyped_storage().data_ptr()
    assert case.ckv_scale == case.kpe_scale
    assert_matches(*case.decode(), *case.decode_ref(), what="fused fp8")


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_scale_errors() -> None:
    case = fp8_case(seed=17)
    good = case.scales
    with pytest.raises(ValueError, match="ckv_scale: required"):
        case.decode(ckv_scale=None)
    with pytest.raises(ValueError, match="kpe_scale: required"):
        case.decode(kpe_scale=None)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="ckv_scale: expected a finite positive float"):
            case.decode(ckv_scale=bad)
    with pytest.raises(TypeError, match="kpe_scale: expected a float"):
        case.decode(kpe_scale=True)
    with pytest.raises(TypeError, match="kpe_scale: expected a float"):
        case.decode(kpe_scale="0.1")
    with pytest.raises(TypeError, match="ckv_scale: expected a one-element float32 tensor"):
        case.decode(ckv_scale=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="ckv_scale: expected a one-element float32 tensor"):
        case.decode(ckv_scale=torch.tensor([1.0], dtype=torch.float64))
    plan = case.plan_decode()
    with pytest.raises(ValueError, match="kpe_scale: required"):
        plan.run(*case.queries(), ckv_scale=good["ckv_scale"])
    wide = make_case(16, lengths(16), page_size=16, dtype=torch.float16, seed=17)
    with pytest.raises(ValueError, match="ckv_scale: given with a 16-bit cache"):
        wide.decode(ckv_scale=0.5, kpe_scale=0.5)
    with pytest.raises(ValueError, match="kpe_scale: given with a 16-bit cache"):
        wide.plan_decode().run(*wide.queries(), kpe_scale=torch.tensor([0.5]))


def test_dtype_errors() -> None:
    case = fp8_case(seed=19)
    with pytest.raises(TypeError, match="q_nope: expected dtype .*the queries stay 16-bit"):
        case.replace(q_nope=case.q_nope.to(FP8)).decode()
    with pytest.raises(TypeError, match="kpe_cache: expected dtype torch.float8_e4m3fn"):
        case.replace(kpe_cache=case.kpe_cache.to(torch.float16)).decode()
    with pytest.raises(TypeError, match="kpe_cache: expected dtype .*float8_e4m3fn for both caches"):
        case.replace(ckv_cache=case.ckv_cache.to(torch.float16)).decode()
    with pytest.raises(TypeError, match="q_pe: expected dtype torch.float16"):
        case.replace(q_pe=case.q_pe.float()).decode()
    with pytest.raises(TypeError, match="kv_dtype: expected None"):
        case.plan_decode(kv_dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match="kv_dtype: expected None"):
        case.plan_decode(kv_dtype="fp8")
    plan = case.plan_decode()
    wide = make_case(16, lengths(16), page_size=16, dtype=torch.float16, seed=19)
    with pytest.raises(TypeError, match="ckv_cache: expected torch.float8_e4m3fn .*mla_paged_decode_h16"):
        plan.run(*wide.queries(), **case.scales)
    plan16 = wide.plan_decode()
    with pytest.raises(TypeError, match="ckv_cache: expected a 16-bit dtype"):
        plan16.run(*case.queries())


def test_fp8_configs_run_the_triton_kernels() -> None:
    """The Gluon kernels take 16-bit tiles: an fp8 spec's module has none, a ws config is refused, and the
    defaults are the H200 sweeps' best for the Triton kernels (64-token tiles, 4 stages below 64 heads per
    program, 3 at 64; prefill 3 stages); a config derived from a 16-bit neighbour takes them too."""
    from tuner.runtime.config import default_decode_config, default_prefill_config, ws_capable
    from tuner.runtime.derive import adapt

    narrow, wide = MLASpec("decode", 16, 512, 64, 64, True), MLASpec("decode", 128, 512, 64, 64, True)
    prefill = MLASpec("prefill_causal", 16, 512, 64, 64, True)
    assert not any(ws_capable(s) for s in (narrow, wide, prefill))
    with pytest.raises(ValueError, match="DecodeConfig.ws"):
        DecodeConfig(ws=1, block_h=16, block_n=64).check_spec(narrow)
    with pytest.raises(ValueError, match="PrefillConfig.ws"):
        PrefillConfig(ws=1, block_m=4, block_h=16).check_spec(prefill)
    d = default_decode_config(narrow, 32, 4096.0, 132)
    assert (d.ws, d.block_h, d.block_n, d.num_stages, d.num_warps, d.tma) == (0, 16, 64, 4, 8, 1)
    d = default_decode_config(wide, 32, 4096.0, 132)
    assert (d.ws, d.block_h, d.block_n, d.num_stages, d.num_warps) == (0, 64, 64, 3, 8)
    p = default_prefill_config(prefill)
    assert (p.ws, p.block_m, p.block_n, p.num_stages, p.tma) == (0, 4, 64, 3, 1)
    from tuner.runtime.buckets import buckets_for
    from tuner.runtime.device import GPUInfo

    gpu = GPUInfo(key="nvidia-h200", name="NVIDIA H200", capability="9.0", num_sms=132, shared_bytes=232448)
    bucket = buckets_for(narrow)[0]
    tuned = DecodeConfig(block_h=16, block_n=64, num_stages=2, ws=1, tma=1, split_tokens=128, pdl=1, align=1)
    got = adapt(tuned, MLASpec("decode", 16, 512, 64, 64), narrow, bucket, gpu)
    assert got is not None and (got.ws, got.num_stages, got.num_warps) == (0, 4, 8)
    assert got.split_tokens == 128  # the split policy carries over


def test_custom_ops_fake_and_routed_scales() -> None:
    """Under FakeTensorMode the ops check the fp8 metadata and scales like eager mode and give the outputs'
    shapes in the queries' dtype; the scale arguments travel in the slots of their kind."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = fp8_case(seed=23)
    assert ops.scale_args(0.5, torch.tensor([1.0]))[:2] == (0.5, None)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = case.replace(**{k: mode.from_tensor(getattr(case, k)) for k in
                               ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "kv_indptr", "kv_indices",
                                "kv_last_page_len")})
        out, lse = fake.decode()
        assert out.shape == case.q_nope.shape and out.dtype == torch.float16 and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="kpe_scale: required"):
            fake.decode(kpe_scale=None)
        out, lse = fake.decode(ckv_scale=mode.from_tensor(torch.tensor([case.ckv_scale])))
        assert out.shape == case.q_nope.shape


def test_plan_keeps_the_16bit_default() -> None:
    """plan() without kv_dtype (or with the queries' 16-bit dtype) is the 16-bit module, unchanged."""
    wide = make_case(16, lengths(16), page_size=16, dtype=torch.float16, seed=29)
    for kv_dtype in (None, torch.float16, torch.bfloat16):
        plan = MLADecode().plan(wide.kv_indptr, wide.kv_indices, wide.kv_last_page_len, num_heads=16, page_size=16,
                                sm_scale=wide.sm_scale, kv_dtype=kv_dtype)
        assert not plan.spec.fp8


_M = None  # the generated module whose fp8 helpers _widen_kernel calls (set by the test)


def _widen_kernel(x_ptr, y_ptr, q_ptr, r_ptr, u_ptr):
    import triton.language as tl

    offs = tl.arange(0, 256)
    tl.store(y_ptr + offs, _M._fp8_widen(tl.load(x_ptr + offs), tl.float16))
    rows = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    q = tl.load(q_ptr + rows)
    qn, qp, unscale = _M._fp8_queries(q, q)
    tl.store(r_ptr + rows, qn)
    tl.store(u_ptr, unscale)


def test_widening_is_exact_for_every_fp8_value() -> None:
    """The kernels' fp8 -> fp16 widening (_fp8_widen) against torch's conversion for every byte; and the
    queries' range scale (_fp8_queries) for bf16 queries beyond fp16's range: a power of two, undone exactly."""
    import triton

    from tuner.runtime.loader import load_module

    global _M
    _M = load_module(MLASpec("decode", 16, 512, 64, 16, True))
    kernel = triton.jit(_widen_kernel)
    x = torch.arange(256, dtype=torch.uint8).view(FP8)
    y = torch.empty(256, dtype=torch.float16)
    q = (torch.randn(16, 16) * 3e4).to(torch.bfloat16)
    q[3, 5] = 2.5e6
    r = torch.empty(16, 16, dtype=torch.float16)
    u = torch.empty(1)
    kernel[(1,)](x, y, q, r, u)
    want = x.to(torch.float16)
    # the 254 finite values exactly (NaN, 0x7f and 0xff, is a GPU's to keep: the interpreter's conversion
    # makes it +-480, the next e4m3 step past 448; masked slots never reach a product either way)
    assert int(want.isnan().sum()) == 2
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])
    assert float(u) == 2.0 ** 8  # 2.5e6 < 2^22: scaled down by 2^(22 - 14)
    assert torch.equal(r.float() * float(u), q.float())
