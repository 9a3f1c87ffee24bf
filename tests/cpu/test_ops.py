"""The runtime API as torch custom ops (tuner.runtime.ops): traced under FakeTensorMode with the right
output shapes and the same errors as eager mode, compiled with ``fullgraph=True`` and no graph break,
and the compiled calls' results against the float32 reference (kernels under the interpreter)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches, make_case
from torch._subclasses.fake_tensor import FakeTensorMode

import tuner

DTYPE = torch.float16


def decode_case():
    return make_case(16, [0, 3, 70], page_size=16, dtype=DTYPE, seed=11)


def prefill_case():
    return make_case(16, [40, 20], [7, 20], page_size=16, dtype=DTYPE, seed=12)


def fake_copy(mode: FakeTensorMode, case):
    """The case with every tensor turned into a fake one (no data)."""
    fields = {k: mode.from_tensor(v) for k, v in vars(case).items() if isinstance(v, torch.Tensor)}
    return case.replace(**fields)


def test_one_call_forms_trace_under_fake_tensors() -> None:
    dec, pre = decode_case(), prefill_case()
    with FakeTensorMode() as mode:
        fdec, fpre = fake_copy(mode, dec), fake_copy(mode, pre)
        out, lse = fdec.decode()
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((3, 16, 512), DTYPE, (3, 16), torch.float32)
        out, lse = fpre.prefill()
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((27, 16, 512), DTYPE, (27, 16), torch.float32)
        given = (fdec.q_nope.new_empty(3, 16, 512), fdec.q_nope.new_empty(3, 16, dtype=torch.float32))
        out, lse = fdec.decode(out=given[0], lse=given[1])
        assert out is given[0] and lse is given[1]


def test_planned_run_traces_under_fake_tensors() -> None:
    dec, pre = decode_case(), prefill_case()
    dplan, pplan = dec.plan_decode(), pre.plan_prefill()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out, lse = dplan.run(*fake_copy(mode, dec).queries())
        assert out.shape == (3, 16, 512) and lse.shape == (3, 16)
        out, lse = pplan.run(*fake_copy(mode, pre).queries())
        assert out.shape == (27, 16, 512) and lse.dtype == torch.float32


def test_bad_input_raises_the_same_errors_while_tracing() -> None:
    dec = decode_case()
    bad = dec.replace(kv_indptr=dec.kv_indptr.long())
    with pytest.raises(TypeError) as eager:
        bad.decode()
    with FakeTensorMode() as mode, pytest.raises(TypeError) as traced:
        fake_copy(mode, bad).decode()
    assert str(traced.value) == str(eager.value) and "kv_indptr" in str(eager.value)
    with FakeTensorMode() as mode, pytest.raises(TypeError, match="sm_scale"):
        fake_copy(mode, dec.replace(sm_scale="0.1")).decode()
    plan = dec.plan_decode()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(ValueError, match="q_nope"):
        plan.run(*fake_copy(mode, dec.replace(q_nope=dec.q_nope[:2])).queries())


def test_fullgraph_compile_without_graph_breaks() -> None:
    dec, pre = decode_case(), prefill_case()
    plan = dec.plan_decode()

    def model(q_nope, q_pe, ckv, kpe, qp_nope, qp_pe):
        o1, l1 = tuner.mla_decode(q_nope, q_pe, ckv, kpe, dec.kv_indptr, dec.kv_indices, dec.sm_scale,
                                  dec.kv_last_page_len)
        o2, l2 = plan.run(q_nope, q_pe, ckv, kpe)
        o3, l3 = tuner.mla_prefill(qp_nope, qp_pe, pre.ckv_cache, pre.kpe_cache, pre.qo_indptr, pre.kv_indptr,
                                   pre.kv_indices, pre.sm_scale, pre.kv_last_page_len)
        return o1 * 2, l1, o2, l2, o3, l3

    args = (*dec.queries(), pre.q_nope, pre.q_pe)
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    o1, l1, o2, l2, o3, l3 = compiled(*args)
    ref_out, ref_lse = dec.decode_ref()
    assert_matches(o1 / 2, l1, ref_out, ref_lse)
    assert_matches(o2, l2, ref_out, ref_lse)
    assert_matches(o3, l3, *pre.prefill_ref())


def test_ops_directly() -> None:
    dec = decode_case()
    out, lse = torch.ops.mla_tuner.decode(dec.q_nope, dec.q_pe, dec.ckv_cache, dec.kpe_cache, dec.kv_indptr,
                                          dec.kv_indices, dec.sm_scale, dec.kv_last_page_len)
    assert_matches(out, lse, *dec.decode_ref())
    torch.library.opcheck(torch.ops.mla_tuner.decode.default,
                          (dec.q_nope, dec.q_pe, dec.ckv_cache, dec.kpe_cache, dec.kv_indptr, dec.kv_indices,
                           dec.sm_scale, dec.kv_last_page_len),
                          test_utils=("test_schema", "test_faketensor"))


# --- decode with several queries per request (queries [B, s_q, H, *]) ---

def speculative_case():
    return make_case(16, [2, 40, 17], [2, 2, 2], page_size=16, dtype=DTYPE, seed=13)


def four_d(case, q_nope=None, q_pe=None):
    """(q_nope, q_pe) of a case of 2 queries per request as [B, 2, H, *]."""
    q_nope, q_pe = case.q_nope if q_nope is None else q_nope, case.q_pe if q_pe is None else q_pe
    return q_nope.unflatten(0, (-1, 2)), q_pe.unflatten(0, (-1, 2))


def test_speculative_decode_traces_under_fake_tensors() -> None:
    case = speculative_case()
    plan = case.plan_decode(q_len=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = fake_copy(mode, case)
        q_nope, q_pe = four_d(fake)
        args = (fake.ckv_cache, fake.kpe_cache, fake.kv_indptr, fake.kv_indices, fake.sm_scale, fake.kv_last_page_len)
        out, lse = tuner.mla_decode(q_nope, q_pe, *args)
        assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((3, 2, 16, 512), DTYPE, (3, 2, 16), torch.float32)
        given = (q_nope.new_empty(3, 2, 16, 512), q_nope.new_empty(3, 2, 16, dtype=torch.float32))
        out, lse = tuner.mla_decode(q_nope, q_pe, *args, out=given[0], lse=given[1])
        assert out is given[0] and lse is given[1]
        out, lse = plan.run(q_nope, q_pe, fake.ckv_cache, fake.kpe_cache)
        assert (out.shape, lse.shape) == ((3, 2, 16, 512), (3, 2, 16))
        with pytest.raises(ValueError, match=r"^q_nope: expected 4 dimensions \[B, s_q, H, ckv\] \(the plan's q_len"):
            plan.run(fake.q_nope, fake.q_pe, fake.ckv_cache, fake.kpe_cache)
        with pytest.raises(ValueError, match=r"^q_pe: expected shape \(3, 2, 16, \*\)"):
            tuner.mla_decode(q_nope, q_pe[:2], *args)
    torch.library.opcheck(torch.ops.mla_tuner.decode.default,
                          (*four_d(case), case.ckv_cache, case.kpe_cache, case.kv_indptr, case.kv_indices,
                           case.sm_scale, case.kv_last_page_len), test_utils=("test_schema", "test_faketensor"))


def test_speculative_decode_compiles_without_graph_breaks() -> None:
    case = speculative_case()
    plan = case.plan_decode(q_len=2)

    def model(q_nope, q_pe, ckv, kpe):
        q_nope, q_pe = four_d(case, q_nope, q_pe)
        o1, l1 = tuner.mla_decode(q_nope, q_pe, ckv, kpe, case.kv_indptr, case.kv_indices, case.sm_scale,
                                  case.kv_last_page_len)
        o2, l2 = plan.run(q_nope, q_pe, ckv, kpe)
        return o1.flatten(0, 1) * 2, l1.flatten(0, 1), o2.flatten(0, 1), l2.flatten(0, 1)

    args = case.queries()
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    o1, l1, o2, l2 = compiled(*args)
    ref_out, ref_lse = case.prefill_ref()
    assert_matches(o1 / 2, l1, ref_out, ref_lse)
    assert_matches(o2, l2, ref_out, ref_lse)
