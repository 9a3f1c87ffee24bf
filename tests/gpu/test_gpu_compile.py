"""On a CUDA GPU: the lean launch path replays compiled kernels without Triton's JIT, and the custom ops
run under torch.compile (fullgraph, and reduce-overhead's CUDA graphs) with no graph break, against the
float32 reference. Run: ``python -m pytest tests/gpu -n 8``."""

from __future__ import annotations

import pytest
import torch
import triton
from helpers import TOLERANCES, assert_matches, make_case

import tuner

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


def cases(page_size: int):
    dec = make_case(16, [1, 700, 4096, 33], page_size=page_size, dtype=DTYPE, device=DEVICE, seed=21)
    pre = make_case(16, [900, 64], [300, 64], page_size=page_size, dtype=DTYPE, device=DEVICE, seed=22)
    return dec, pre


@pytest.mark.parametrize("page_size", [1, 64])
def test_replay_does_not_touch_the_jit(monkeypatch, page_size: int) -> None:
    dec, pre = cases(page_size)
    dplan, pplan = dec.plan_decode(), pre.plan_prefill()
    dplan.run(*dec.queries())
    pplan.run(*pre.queries())
    dec.decode()
    torch.cuda.synchronize()

    def jit_run(*args, **kwargs):
        raise AssertionError("a replayed call went through Triton's JIT")

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", jit_run)
    tol = TOLERANCES[DTYPE]
    for seed in (1, 2):
        d, p = dec.with_query(seed), pre.with_query(seed)
        assert_matches(*dplan.run(*d.queries()), *d.decode_ref(), tol)
        assert_matches(*pplan.run(*p.queries()), *p.prefill_ref(), tol)
        assert_matches(*d.decode(), *d.decode_ref(), tol)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_model(mode: str | None) -> None:
    dec, pre = cases(64)
    plan = dec.plan_decode()

    def model(q_nope, q_pe, qp_nope, qp_pe):
        o1, l1 = tuner.mla_decode(q_nope, q_pe, dec.ckv_cache, dec.kpe_cache, dec.kv_indptr, dec.kv_indices,
                                  dec.sm_scale, dec.kv_last_page_len)
        o2, l2 = plan.run(q_nope, q_pe, dec.ckv_cache, dec.kpe_cache)
        o3, l3 = tuner.mla_prefill(qp_nope, qp_pe, pre.ckv_cache, pre.kpe_cache, pre.qo_indptr, pre.kv_indptr,
                                   pre.kv_indices, pre.sm_scale, pre.kv_last_page_len)
        return o1 + 0, l1, o2, l2, o3, l3

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*dec.queries()[:2], pre.q_nope, pre.q_pe)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    tol = TOLERANCES[DTYPE]
    for seed in range(4):  # warm-up, capture, replays: each on fresh queries
        d, p = dec.with_query(seed), pre.with_query(seed)
        o1, l1, o2, l2, o3, l3 = (t.clone() for t in compiled(d.q_nope, d.q_pe, p.q_nope, p.q_pe))
        torch.cuda.synchronize()
        ref = d.decode_ref()
        assert_matches(o1, l1, *ref, tol)
        assert_matches(o2, l2, *ref, tol)
        assert_matches(o3, l3, *p.prefill_ref(), tol)
