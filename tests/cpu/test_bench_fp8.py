"""``mla-tune bench --kv-dtype``: the fp8 (float8_e4m3fn) cache rows of the benchmark.

The inputs (``make_inputs(..., kv_dtype=FP8)``: quantized from the same draws, per-tensor scales, NaN in
unused slots, one scale for the fused cache; the 16-bit path byte for byte as before), the bytes they count,
the peers' fp8 calls against fake ``flash_mla`` / ``flashinfer`` modules (what a GPU would run is not
reachable here), the inexact status of a peer that quantizes more than the cache, the rows and reports
with ``--kv-dtype both`` (in process and through the command line) and, once the runtime takes an fp8
cache, ours under the interpreter against the reference.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from test_bench import fake_flash_mla, mla_tune, small

from tuner.bench import report as bench_report
from tuner.bench import run as bench_run
from tuner.bench.flashinfer_mla import FlashInferPeer
from tuner.bench.flashmla import FlashMLAPeer
from tuner.bench.ours import OursFunctional, OursPlanRun, implementations
from tuner.bench.peers import Impl, NotApplicable, Prepared, TorchPeer
from tuner.harness.floors import Ceilings
from tuner.harness.inputs import FP8, FP8_MAX, Workload, fp8_scale, make_inputs
from tuner.harness.reference import mla_prefill_ref
from tuner.runtime.decode import MLADecode
from tuner.runtime.prefill import MLAPrefill

FP8_API = all("kv_dtype" in inspect.signature(cls.plan).parameters for cls in (MLADecode, MLAPrefill))
NO_FP8_API = ("the runtime's fp8 cache path has not landed: MLADecode.plan / MLAPrefill.plan take no kv_dtype "
              "(and run / mla_decode / mla_prefill no ckv_scale / kpe_scale)")
CPU = torch.device("cpu")
CEILINGS = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e12, copy_bytes=1, matmul_n=1)


def settings(**changes: object) -> bench_run.Settings:
    base = dict(device=CPU, dtype=torch.float16, runs=1, warmup=0, check_seqs=0, seed=0, dry_run=True)
    return bench_run.Settings(**{**base, **changes})  # type: ignore[arg-type]


def reference(w: Workload, x) -> tuple[torch.Tensor, torch.Tensor]:
    return bench_run.reference_prefix(w, x, 0)[:2]


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------

def digest(x) -> str:
    """sha256 of every tensor of an Inputs (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name in ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "kv_indptr", "kv_indices", "kv_last_page_len",
                 "qo_indptr", "kv_cache"):
        t = getattr(x, name)
        h.update(f"{name}{None if t is None else (tuple(t.shape), t.dtype)}".encode())
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("w, page_size, dtype, seed, fused, expected", [
    (Workload("a", 4, (70, 5, 33), (2, 2, 2), head_dim_ckv=64, head_dim_kpe=32), 16, torch.float32, 5, False,
     "106a0bf9ad9eb260"),
    (Workload("b", 16, (70, 5, 33)), 64, torch.bfloat16, 0, True, "f2886c013e5daaf3"),
    (Workload("c", 8, (40, 9), (6, 3)), 1, torch.float16, 1, False, "65c8b1a19b8cb9c2"),
], ids=["f32-ps16", "bf16-ps64-fused", "f16-ps1"])
def test_16bit_inputs_are_those_made_before_fp8(w: Workload, page_size: int, dtype: torch.dtype, seed: int,
                                                 fused: bool, expected: str) -> None:
    """The digests were taken from make_inputs as it was before kv_dtype existed (commit 588f576)."""
    x = make_inputs(w, page_size, dtype, seed=seed, fused=fused)
    assert digest(x) == expected
    assert x.ckv_scale is None and x.kpe_scale is None and x.scales == {}
    assert digest(make_inputs(w, page_size, dtype, seed=seed, fused=fused, kv_dtype=dtype)) == expected


@pytest.mark.parametrize("page_size", [1, 16])
def test_fp8_inputs_quantize_the_same_values_per_cache(page_size: int) -> None:
    w = Workload("w", 4, (70, 5, 33, 16), head_dim_ckv=64, head_dim_kpe=32)
    base = make_inputs(w, page_size, torch.bfloat16, seed=3, spare_pages=2)
    x = make_inputs(w, page_size, torch.bfloat16, seed=3, spare_pages=2, kv_dtype=FP8)
    assert x.ckv_cache.dtype == x.kpe_cache.dtype == FP8 and x.kv_cache is None
    assert x.q_nope.dtype == torch.bfloat16  # the queries stay 16-bit, and the same draws
    for name in ("q_nope", "q_pe", "kv_indptr", "kv_indices", "kv_last_page_len"):
        assert torch.equal(getattr(x, name), getattr(base, name)), name
    assert isinstance(x.ckv_scale, float) and isinstance(x.kpe_scale, float)
    assert x.scales == {"ckv_scale": x.ckv_scale, "kpe_scale": x.kpe_scale}
    for q, b, scale in ((x.ckv_cache, base.ckv_cache, x.ckv_scale), (x.kpe_cache, base.kpe_cache, x.kpe_scale)):
        finite = torch.isfinite(b)
        amax = b.float()[finite].abs().max()
        assert 0 < scale and scale == pytest.approx(float(amax) / FP8_MAX, rel=1e-6)  # one scale per cache
        assert float(q.float()[finite].abs().max()) == FP8_MAX  # the whole fp8 range is used
        # dequantized, the same values to fp8's precision (3 mantissa bits: half a step is 1/16 relative)
        torch.testing.assert_close(q.float()[finite] * scale, b.float()[finite], rtol=1 / 16, atol=scale / 2**9)
        assert torch.equal(torch.isnan(q.float()), ~finite)  # NaN exactly where the 16-bit cache has it
    if page_size > 1:  # partial last pages: their unused slots are NaN (fp8 e4m3fn has a NaN)
        assert bool(torch.isnan(x.ckv_cache.float()).any()) and bool(torch.isnan(x.kpe_cache.float()).any())


def test_fp8_fused_inputs_are_views_of_one_fp8_cache_with_one_scale() -> None:
    w = Workload("w", 4, (70, 5, 130), (2, 2, 2))
    split = make_inputs(w, 64, torch.bfloat16, seed=2, kv_dtype=FP8)
    x = make_inputs(w, 64, torch.bfloat16, seed=2, kv_dtype=FP8, fused=True)
    assert x.kv_cache is not None and x.kv_cache.dtype == FP8 and x.kv_cache.shape[-1] == 576
    assert x.ckv_cache.data_ptr() == x.kv_cache.data_ptr()
    assert x.kpe_cache.data_ptr() == x.kv_cache[..., 512:].data_ptr()
    assert x.ckv_cache.untyped_storage().data_ptr() == x.kpe_cache.untyped_storage().data_ptr()
    assert x.ckv_scale == x.kpe_scale == max(split.ckv_scale, split.kpe_scale)  # FlashMLA's one descale_k
    assert torch.isnan(x.kv_cache.float()).any()  # the NaN poisoning still applies
    ref = reference(w, x)  # the reference dequantizes each view with the shared scale
    assert bool(torch.isfinite(ref[0]).all())


def test_fp8_scale_and_bad_kv_dtype() -> None:
    assert fp8_scale(torch.zeros(3)) == 1.0 and fp8_scale(torch.empty(0)) == 1.0
    assert fp8_scale(torch.tensor([-896.0, 1.0])) == 2.0
    assert fp8_scale(torch.tensor([1.0]), torch.tensor([-4.48])) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="kv_dtype"):
        make_inputs(Workload("w", 4, (5,)), 1, torch.bfloat16, kv_dtype=torch.float16)


def test_bytes_count_the_fp8_cache_at_one_byte() -> None:
    w = Workload("w", 16, (100, 28), (4, 4))
    kv, q, out = 128 * 576, 8 * 16 * 576, 8 * 16 * 512
    assert w.bytes_moved() == w.bytes_moved(2, 2) == kv * 2 + q * 2 + out * 2 + 8 * 16 * 4
    assert w.bytes_moved(2, 1) == kv * 1 + q * 2 + out * 2 + 8 * 16 * 4  # q, out bf16 and lse float32 stay
    assert w.bytes_moved(4) == kv * 4 + q * 4 + out * 4 + 8 * 16 * 4


# ---------------------------------------------------------------------------------------------------
# Adapters over an fp8 cache
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", ["decode", "prefill_causal"])
def test_torch_peer_dequantizes_the_fp8_cache(kind: str, page_size: int) -> None:
    w = small(kind)
    x = make_inputs(w, page_size, torch.float32, seed=3, spare_pages=3, kv_dtype=FP8)
    out, lse = TorchPeer().prepare(w, x, page_size).call()
    ref_out, ref_lse = reference(w, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_which_implementations_have_an_fp8_path() -> None:
    impls = implementations(["fa3", "fa2", "flashmla", "sglang", "torch"])
    assert {k for k, impl in impls.items() if impl.fp8} == {"ours", "ours_fn", "fa3", "flashmla", "torch"}
    assert not OursPlanRun(default=True).fp8 and OursPlanRun().fp8 and OursFunctional().fp8


def fake_flash_mla_fp8(calls: list[dict]) -> types.ModuleType:
    """:func:`test_bench.fake_flash_mla` with FlashMLA's fp8 path as docs/peers.md describes it: fp8 q and
    cache, descale_q / descale_k one-element float32 tensors (value = fp8 * descale), scheduler metadata
    filled by get_mla_decoding_metadata before the first call, bf16 output; the 16-bit path as before."""
    module = fake_flash_mla([])
    dense = module.flash_mla_with_kvcache

    def get_mla_decoding_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=False,
                                  use_legacy=False):
        calls.append({"metadata": (num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache, use_legacy)})
        return torch.zeros(4, 8, dtype=torch.int32), torch.zeros(cache_seqlens.numel() + 1, dtype=torch.int32)

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=None,
                               causal=False, use_legacy=False, is_fp8_kvcache=False, descale_q=None,
                               descale_k=None):
        if not is_fp8_kvcache:
            return dense(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=softmax_scale,
                         causal=causal, use_legacy=use_legacy)
        assert q.dtype == k_cache.dtype == FP8
        for descale in (descale_q, descale_k):
            assert descale.dtype == torch.float32 and descale.shape == (1,)
        assert meta.tile_scheduler_metadata is not None and meta.num_splits is not None
        calls.append({"kv_ptr": k_cache.data_ptr(), "descale_q": float(descale_q), "descale_k": float(descale_k)})
        out, lse = dense((q.float() * descale_q).contiguous(), k_cache.float() * descale_k, block_table,
                         cache_seqlens, head_dim_v, meta, softmax_scale=softmax_scale, causal=causal,
                         use_legacy=use_legacy)
        return out.to(torch.bfloat16), lse

    module.get_mla_decoding_metadata = get_mla_decoding_metadata  # type: ignore[attr-defined]
    module.flash_mla_with_kvcache = flash_mla_with_kvcache  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("q_lens", [None, (2, 2, 2)], ids=["decode", "mtp2"])
def test_flashmla_fp8_adapter_with_a_fake_module(q_lens: tuple[int, ...] | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 queries with their own scale, the cache's one scale as descale_k, the metadata filled first,
    the fused cache read in place; the result within the well-formed check and its error reported."""
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "flash_mla", fake_flash_mla_fp8(calls))
    w = Workload("w", 4, (70, 5, 130), q_lens)
    x = make_inputs(w, 64, torch.bfloat16, seed=2, spare_pages=2, fused=True, kv_dtype=FP8)
    peer = FlashMLAPeer()
    assert peer.inexact(x) and peer.inexact(make_inputs(w, 64, torch.bfloat16, fused=True)) is None
    prepared = peer.prepare(w, x, 64)
    s_q = 1 if q_lens is None else 2
    assert calls[0]["metadata"] == (s_q * 4, 1, True, True)
    assert prepared.info["kv_scale"] == x.ckv_scale and prepared.info["q_scale"] > 0
    entry = bench_run.run_impl(peer, w, x, 64, reference(w, x), settings(dtype=torch.bfloat16))
    call = next(c for c in calls if "kv_ptr" in c)  # run_impl's own prepare filled its metadata first
    assert call["kv_ptr"] == x.kv_cache.data_ptr() and call["descale_k"] == pytest.approx(x.ckv_scale)
    assert call["descale_q"] == pytest.approx(prepared.info["q_scale"])
    # the quantized queries cost FlashMLA the lse bar (1e-3; here about 0.09): timed all the same, marked
    assert entry["status"] == "inexact" and entry["median_us"] > 0, entry
    assert entry["note"].startswith("fp8 cache: FlashMLA quantizes the queries to fp8 too: ")
    assert 0 < entry["rel_err"] < 0.05 and 1e-3 < entry["lse_err"] < 0.25


def test_flashmla_fp8_needs_one_scale_for_both_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_mla", fake_flash_mla_fp8([]))
    w = Workload("w", 4, (70, 5))
    x = make_inputs(w, 64, torch.bfloat16, kv_dtype=FP8)  # split: a scale per cache
    assert x.ckv_scale != x.kpe_scale
    with pytest.raises(NotApplicable, match="one scale"):
        FlashMLAPeer().prepare(w, x, 64)


def fake_flashinfer(calls: list[dict], scale_mode: bool) -> dict[str, types.ModuleType]:
    """FlashInfer's MLA wrapper restated over the float32 reference: plan() with MLAPlanMetadata (and a
    ``scale_mode`` where ``scale_mode``, as newer releases plan the run's scale arguments), run() with
    structural inputs and the per-tensor scales of an fp8 cache as floats."""
    package, mla = types.ModuleType("flashinfer"), types.ModuleType("flashinfer.mla")

    class MLAPlanMetadata:
        @staticmethod
        def csr(qo_indptr, kv_indptr, kv_indices, kv_len):
            return types.SimpleNamespace(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices,
                                         kv_len=kv_len)

    class Wrapper:
        def __init__(self, workspace, backend="auto"):
            self.backend = backend

        def _plan(self, metadata, page_size, causal, sm_scale, kv_data_type, **kwargs):
            calls.append({"kv_data_type": kv_data_type, **kwargs})
            self.metadata, self.page_size, self.causal, self.sm_scale = metadata, page_size, causal, sm_scale

        def run(self, *, query, kv_cache, out, lse, return_lse, ckv_scale=None, kpe_scale=None):
            assert return_lse
            calls.append({"ckv_scale": ckv_scale, "kpe_scale": kpe_scale})
            m, ps = self.metadata, self.page_size
            last = torch.where(m.kv_len > 0, (m.kv_len - 1) % ps + 1, ps).to(torch.int32)
            scales = {} if ckv_scale is None else {"ckv_scale": ckv_scale, "kpe_scale": kpe_scale}
            o, l2 = mla_prefill_ref(*query, *kv_cache, m.qo_indptr, m.kv_indptr, m.kv_indices, self.sm_scale, last,
                                    causal=self.causal, **scales)
            out.copy_(o)
            lse.copy_(l2)
            return out, lse

    if scale_mode:
        class BatchMLAPagedAttentionWrapper(Wrapper):
            def plan(self, *, metadata, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale,
                     q_data_type, kv_data_type, query_layout, kv_cache_layout, lse_mode, scale_mode="default"):
                self._plan(metadata, page_size, causal, sm_scale, kv_data_type, scale_mode=scale_mode)
    else:
        class BatchMLAPagedAttentionWrapper(Wrapper):  # type: ignore[no-redef]
            def plan(self, *, metadata, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale,
                     q_data_type, kv_data_type, query_layout, kv_cache_layout, lse_mode):
                self._plan(metadata, page_size, causal, sm_scale, kv_data_type)

    mla.BatchMLAPagedAttentionWrapper = BatchMLAPagedAttentionWrapper  # type: ignore[attr-defined]
    mla.MLAPlanMetadata = MLAPlanMetadata  # type: ignore[attr-defined]
    package.mla = mla  # type: ignore[attr-defined]
    return {"flashinfer": package, "flashinfer.mla": mla}


@pytest.mark.parametrize("scale_mode", [True, False], ids=["plans-scale-mode", "older"])
@pytest.mark.parametrize("kind", ["decode", "prefill_causal"])
def test_flashinfer_fp8_adapter_with_a_fake_module(kind: str, scale_mode: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    for name, module in fake_flashinfer(calls, scale_mode).items():
        monkeypatch.setitem(sys.modules, name, module)
    w = small(kind)
    x = make_inputs(w, 16, torch.bfloat16, seed=1, kv_dtype=FP8)
    prepared = FlashInferPeer("fa3").prepare(w, x, 16)
    assert calls[0]["kv_data_type"] == FP8
    assert calls[0].get("scale_mode") == ("kv-per-tensor" if scale_mode else None)
    out, lse = prepared.outputs()
    assert calls[1] == {"ckv_scale": x.ckv_scale, "kpe_scale": x.kpe_scale}
    assert all(isinstance(v, float) for v in calls[1].values())
    passed, _, _, why = bench_run.check_output(out, lse, *reference(w, x))
    assert passed, why
    assert prepared.info["kv_data_type"] == "float8_e4m3fn"
    bf16 = make_inputs(w, 16, torch.bfloat16, seed=1)  # a 16-bit cache: no scales anywhere, as before
    prepared = FlashInferPeer("fa3").prepare(w, bf16, 16)
    prepared.outputs()
    assert calls[2] == {"kv_data_type": torch.bfloat16, **({"scale_mode": "default"} if scale_mode else {})}
    assert calls[3] == {"ckv_scale": None, "kpe_scale": None}
    assert prepared.info == {"backend": "fa3", "causal": kind != "decode"}


# ---------------------------------------------------------------------------------------------------
# The inexact status
# ---------------------------------------------------------------------------------------------------

class Off(Impl):
    """Returns the reference times ``factor`` (or with a NaN); inexact by design where ``why``."""

    key = "off"

    def __init__(self, ref: tuple[torch.Tensor, torch.Tensor], factor: float, why: str | None,
                 nan: bool = False) -> None:
        self.ref, self.factor, self.why, self.nan = ref, factor, why, nan

    def inexact(self, inp) -> str | None:
        return self.why

    def prepare(self, w, inp, page_size) -> Prepared:
        out = (self.ref[0] * self.factor).to(inp.q_nope.dtype)
        if self.nan:
            out[0, 0, 0] = math.nan
        return Prepared(lambda: (out, self.ref[1].clone()))


def test_an_inexact_peer_is_timed_and_marked_a_malformed_one_is_not() -> None:
    w = small("decode")
    x = make_inputs(w, 16, torch.float32, seed=0, kv_dtype=FP8)
    ref = reference(w, x)
    s = settings(dtype=torch.float32)
    exact = bench_run.run_impl(Off(ref, 1.0, "lossy"), w, x, 16, ref, s)
    assert exact["status"] == "ok" and exact["note"] == ""
    lossy = bench_run.run_impl(Off(ref, 1.1, "queries in fp8"), w, x, 16, ref, s)
    assert lossy["status"] == "inexact" and lossy["median_us"] > 0 and lossy["rel_err"] == pytest.approx(0.1, rel=1e-2)
    assert lossy["note"].startswith("queries in fp8: ") and "miss atol" in lossy["note"]
    assert bench_run.run_impl(Off(ref, 1.1, None), w, x, 16, ref, s)["status"] == "wrong"
    nan = bench_run.run_impl(Off(ref, 1.0, "queries in fp8", nan=True), w, x, 16, ref, s)
    assert nan["status"] == "wrong" and "median_us" not in nan and "non-finite" in nan["note"]
    row = {"row": "r", "page_size": 16, "kv_dtype": "fp8", "seconds": 0.1, "bytes": 10**4, "flops": 10**6,
           "floor_us": 1.0, "impls": {"ours": lossy}}
    bench_run._derive(row)
    cols = bench_report.table_line(row, ["ours"], 8).split()
    assert cols[:3] == ["r:fp8", "16", bench_report._us(lossy["median_us"]) + "~"]
    doc = {"impls": {}, "rows": [{**row, "batch": 1, "checked_seqs": 1, "impls": {"off": lossy}}], "dry_run": False}
    assert any(line.startswith("INEXACT") and "r:fp8 ps16" in line for line in bench_report.summary(doc))


# ---------------------------------------------------------------------------------------------------
# Rows and reports with both cache dtypes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_layout", ["auto", "split"])
def test_bench_rows_over_bf16_and_fp8(cache_layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_row over bf16 then fp8 at page size 64: ours' stand-in (the PyTorch peer under ours' key),
    FlashMLA against its fake, a peer without an fp8 path and a skipped one."""
    monkeypatch.setitem(sys.modules, "flash_mla", fake_flash_mla_fp8([]))
    stand_in, no_fp8 = TorchPeer(), TorchPeer()
    stand_in.key, no_fp8.key, no_fp8.fp8 = "ours", "nofp8", False
    impls: dict[str, Impl] = {"ours": stand_in, "flashmla": FlashMLAPeer(), "nofp8": no_fp8, "gone": TorchPeer()}
    s = settings(dtype=torch.bfloat16, cache_layout=cache_layout, kv_dtypes=("bf16", "fp8"))
    w = Workload("w", 4, (70, 5, 130))
    bf16, fp8 = [bench_run.bench_row(w, 64, impls, {"gone": "not here"}, set(), CEILINGS, s, lambda line: None, kv)
                 for kv in ("bf16", "fp8")]
    assert (bf16["kv_dtype"], fp8["kv_dtype"]) == ("bf16", "fp8")
    assert bf16["cache"] == fp8["cache"] == ("fused" if cache_layout == "auto" else "split")
    assert bf16["bytes"] == w.bytes_moved(2) and fp8["bytes"] == w.bytes_moved(2, 1)
    assert fp8["floor_us"] < bf16["floor_us"]  # the copy floor counted in fp8 bytes
    assert fp8["impls"]["ours"]["status"] == "ok" and fp8["impls"]["ours"]["floor_frac"] > 0
    assert fp8["impls"]["nofp8"] == {"status": "n/a", "note": "16-bit cache only (no fp8 path)"}
    assert bf16["impls"]["nofp8"]["status"] == "ok"
    assert fp8["impls"]["gone"] == {"status": "skipped", "note": "not here"}
    assert bf16["impls"]["flashmla"]["status"] == "ok"
    flashmla = fp8["impls"]["flashmla"]
    if cache_layout == "split":  # two scales: FlashMLA's one descale_k cannot read them
        assert flashmla == {"status": "n/a", "note": "fp8: one scale for ckv and kpe (the fused cache layout) only"}
    else:
        assert flashmla["status"] in ("ok", "inexact") and flashmla["ours_over"] > 0


def doc_with_fp8_rows() -> dict:
    """A results document with a bf16 and an fp8 row of each of two rows (made-up times)."""
    def row(name: str, kv: str, ours: float, fa3: float | None, flashmla: dict, bf16: float | None = None) -> dict:
        r = {"row": name, "kind": "decode", "heads": 16, "batch": 2, "total_q": 2, "kv_tokens": 100, "page_size": 64,
             "cache": "fused", "kv_dtype": kv, "bytes": 1000 if kv == "fp8" else 2000, "flops": 10**6,
             "floor_us": 5.0 if kv == "fp8" else 10.0, "checked_seqs": 2, "seconds": 0.5,
             "impls": {"ours": {"status": "ok", "median_us": ours},
                       "ours_default": {"status": "n/a", "note": "16-bit cache only"} if kv == "fp8" else
                       {"status": "ok", "median_us": ours},
                       "fa3": {"status": "ok", "median_us": fa3} if fa3 else {"status": "error", "note": "x"},
                       "fa2": {"status": "n/a"} if kv == "fp8" else {"status": "ok", "median_us": 30.0},
                       "flashmla": flashmla}}
        if bf16 is not None:
            r["ours_bf16_us"] = bf16
        bench_run._derive(r)
        return r

    inexact = {"status": "inexact", "median_us": 8.0, "rel_err": 0.031, "note": "fp8 cache: ..."}
    rows = [row("d-a", "bf16", 20.0, 25.0, {"status": "ok", "median_us": 18.0}),
            row("d-a", "fp8", 12.0, 60.0, inexact, bf16=20.0),
            row("d-b", "bf16", 40.0, None, {"status": "ok", "median_us": 45.0}),
            row("d-b", "fp8", 25.0, None, {"status": "wrong", "note": "NaN"}, bf16=40.0)]
    impls = {k: {"label": k, "available": True, "reason": None, "returns_lse": True, "fp8": k in ("ours", "fa3",
                                                                                                "flashmla")}
             for k in ("ours", "ours_default", "fa3", "fa2", "flashmla")}
    return {"schema": bench_report.SCHEMA_VERSION, "tool": "mla-tune bench", "dry_run": False, "note": "",
            "env": {"gpu": "NVIDIA H200", "gpu_key": "nvidia-h200", "date": "2026-12-04T00:00:00+00:00",
                    "torch": "2.11", "triton": "3.6", "flashinfer": "0.7.4", "flash_mla": "1.0.0"},
            "ceilings": {"copy_gbps": 4000.0, "matmul_tflops": 800.0}, "settings": {"kv_dtypes": ["bf16", "fp8"]},
            "impls": impls, "rows": rows}


def test_fp8_table_puts_ours_bf16_beside_ours_fp8_and_the_fp8_peers() -> None:
    doc = doc_with_fp8_rows()
    lines = bench_report.fp8_table(doc["rows"], ["ours", "fa3", "flashmla"])
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == ("| row | ps | ours fp8 µs | ours bf16 µs | fp8 / bf16 | fa3 fp8 µs | ours / fa3 | "
                        "FlashMLA fp8 µs | ours / FlashMLA | floor |")
    assert table[2] == "| d-a | 64 | 12.0 | 20.0 | 0.60 | 60.0 | 0.20 | 8.0~ | 1.50 | 0.42 |"
    assert table[3] == "| d-b | 64 | 25.0 | 40.0 | 0.62 | ERROR | - | WRONG | - | 0.20 |"
    assert len(table) == 4  # bf16 rows stay out of it
    assert lines[-1].startswith("~ FlashMLA: missed the tolerance by design") and "0.031" in lines[-1]
    assert bench_report.fp8_table([r for r in doc["rows"] if r["kv_dtype"] == "bf16"], ["ours", "fa3"]) == []


def test_results_files_carry_the_fp8_rows(tmp_path: Path) -> None:
    doc = doc_with_fp8_rows()
    written, _ = bench_report.write_results(doc, tmp_path, figure=False)
    assert [p.name for p in written] == ["bench.json", "bench.csv", "bench_fp8.md"]
    md = (tmp_path / "bench_fp8.md").read_text()
    assert md.startswith("# mla-tune bench, fp8 KV cache: NVIDIA H200, 2026-12-04") and "flash_mla 1.0.0" in md
    assert "| d-a | 64 | 12.0 | 20.0 | 0.60 |" in md
    with open(tmp_path / "bench.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0])[-2:] == ["kv_dtype", "ours_bf16_us"]  # after the columns bf16 runs always had
    fp8_ours = [line for line in lines if line["impl"] == "ours" and line["kv_dtype"] == "fp8"]
    assert [(line["row"], line["ours_bf16_us"]) for line in fp8_ours] == [("d-a", "20.0"), ("d-b", "40.0")]
    assert {line["ours_bf16_us"] for line in lines if line["kv_dtype"] == "bf16"} == {""}
    assert bench_report.ours_ok(doc)  # ours_default n/a on fp8 rows does not count as a failure
    bf16_only = {**doc, "rows": [r for r in doc["rows"] if r["kv_dtype"] == "bf16"]}
    assert [p.name for p in bench_report.write_results(bf16_only, tmp_path / "b", figure=False)[0]] == [
        "bench.json", "bench.csv"]


def test_compare_keeps_bf16_and_fp8_rows_apart() -> None:
    old, new = doc_with_fp8_rows(), doc_with_fp8_rows()
    new["rows"][1]["impls"]["ours"]["median_us"] = 14.0  # fp8 moved, bf16 did not
    lines, within = bench_report.compare(old, new, 0.05)
    assert not within
    assert any(line.split()[:3] == ["d-a:fp8", "64", "ours"] and "outside" in line for line in lines)
    assert not any(line.split()[:3] == ["d-a", "64", "ours"] and "outside" in line for line in lines)
    assert bench_report.kv_dtypes(old) == ["bf16", "fp8"] and bench_report.kv_dtypes({"settings": {}}) == ["bf16"]


def test_figure_shows_ours_bf16_beside_the_fp8_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert bench_report.draw_figure(doc_with_fp8_rows(), tmp_path / "f.png") == ""
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_command_line_runs_both_cache_dtypes_and_compare_keeps_them(tmp_path: Path) -> None:
    """A dry run of one row at page size 64 with --kv-dtype both: the fp8 row after the bf16 one, with
    ours' bf16 time; --compare reruns both. Ours' fp8 rows run where the runtime takes an fp8 cache."""
    proc = mla_tune("--dry-run", "--kv-dtype", "both", "--rows", "dry-d-b3", "--page-size", "64", "--no-figure",
                    "--out", str(tmp_path / "a"))
    assert proc.returncode == (0 if FP8_API else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("dry-")]
    assert [cols[:2] for cols in lines] == [["dry-d-b3", "64"], ["dry-d-b3:fp8", "64"]]
    assert lines[1][-3:-1] == ["bf16", lines[0][2]]  # "ours bf16 <the bf16 row's time> µs"
    assert bench_report.FP8_TITLE in proc.stdout and "| dry-d-b3 | 64 |" in proc.stdout
    folder = tmp_path / "a" / "cpu-interpreter"
    doc = bench_report.load_results(folder / "bench.json")
    assert doc["settings"]["kv_dtypes"] == ["bf16", "fp8"] and doc["impls"]["torch"]["fp8"]
    bf16, fp8 = doc["rows"]
    assert fp8["ours_bf16_us"] == bf16["impls"]["ours"]["median_us"] and "ours_bf16_us" not in bf16
    assert fp8["impls"]["torch"]["status"] == "ok" and fp8["impls"]["ours_default"]["status"] == "n/a"
    assert fp8["impls"]["ours"]["status"] == ("ok" if FP8_API else "error")
    assert (folder / "bench_fp8.md").exists()
    again = mla_tune("--compare", str(folder / "bench.json"), "--tolerance", "1000", "--no-figure",
                     "--out", str(tmp_path / "b"))
    assert any(line.startswith("dry-d-b3:fp8  64 ours") for line in again.stdout.splitlines()) == FP8_API
    assert bench_report.load_results(tmp_path / "b" / "cpu-interpreter" / "bench.json")["settings"][
        "kv_dtypes"] == ["bf16", "fp8"]


# ---------------------------------------------------------------------------------------------------
# Ours over an fp8 cache, under the interpreter
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not FP8_API, reason=NO_FP8_API)
@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("q_lens", [None, (3, 2), (2, 2)], ids=["decode", "prefill", "mtp2"])
def test_ours_adapters_over_an_fp8_cache(q_lens: tuple[int, ...] | None, page_size: int) -> None:
    """plan/run and the one call with kv_dtype and the scales, on one tiny fp8 row (fused at page size 64,
    as the bench builds it), against the float32 reference over the dequantized cache."""
    w = Workload("tiny", 16, (70, 5), q_lens)
    x = make_inputs(w, page_size, torch.float16, seed=0, fused=page_size == 64, kv_dtype=FP8)
    ref = reference(w, x)
    for impl in (OursPlanRun(), OursFunctional()):
        entry = bench_run.run_impl(impl, w, x, page_size, ref, settings())
        assert entry["status"] == "ok", (impl.key, entry)
    info = OursPlanRun().prepare(w, x, page_size).info
    assert str(info["kernel"]).endswith("_fp8e4m3")
