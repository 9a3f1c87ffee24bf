"""The lean launch path (tuner.runtime.launch): a call's launches recorded once per tensor-metadata key and
replayed with new tensors. Under the interpreter the replay runs the interpreted kernels with the recorded
arguments, so these tests check the substitution itself against the reference, and count what a
replayed ``run()`` does: no validation, no dispatch lookup, no module ``launch()``, no allocation but the
outputs."""

from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_matches, count_runtime_allocations, forbid, fresh, make_case, poisoned_outputs

import tuner
from tuner.runtime import decode, dispatch, launch, loader, validate

DTYPE = torch.float16


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("given_outputs", [True, False], ids=["out", "no_out"])
def test_decode_run_replays(monkeypatch, page_size: int, given_outputs: bool) -> None:
    case = make_case(16, [0, 1, 37, 2 * page_size + 3, 90], page_size=page_size, dtype=DTYPE)
    plan = case.plan_decode()
    outputs = poisoned_outputs(5, 16, 512, DTYPE) if given_outputs else (None, None)
    plan.run(*case.queries(), out=outputs[0], lse=outputs[1])
    key = launch.call_key(*case.queries(), *outputs)
    assert isinstance(plan._plan.launches.get(key), launch.Replay), "the first run() records its launches"

    forbid(monkeypatch, (validate, "check_inputs"), (validate, "check_outputs"), (dispatch, "select"),
           (plan._plan.module, "launch"), (loader, "load_module"))
    allocations = count_runtime_allocations(monkeypatch)
    for seed in (1, 2):
        new = fresh(case, seed)
        outputs = poisoned_outputs(5, 16, 512, DTYPE) if given_outputs else (None, None)
        out, lse = plan.run(*new.queries(), out=outputs[0], lse=outputs[1])
        assert_matches(out, lse, *new.decode_ref())
    assert allocations == ([] if given_outputs else ["outputs", "outputs"] * 2)


def test_prefill_run_replays(monkeypatch) -> None:
    case = make_case(16, [40, 64, 17], [5, 64, 1], page_size=16, dtype=DTYPE)
    plan = case.plan_prefill()
    plan.run(*case.queries())
    forbid(monkeypatch, (validate, "check_inputs"), (dispatch, "select"), (plan._plan.module, "launch"))
    allocations = count_runtime_allocations(monkeypatch)
    new = fresh(case, 3)
    out, lse = plan.run(*new.queries())
    assert_matches(out, lse, *new.prefill_ref())
    assert allocations == ["outputs", "outputs"]


def test_one_call_forms_replay(monkeypatch) -> None:
    dec = make_case(16, [0, 5, 130], page_size=64, dtype=DTYPE, seed=4)
    pre = make_case(16, [40, 64], [5, 64], page_size=64, dtype=DTYPE, seed=5)
    dec.decode()
    pre.prefill()
    forbid(monkeypatch, (validate, "spec_from_tensors"), (dispatch, "decode_config"),
           (dispatch, "prefill_config"))
    allocations = count_runtime_allocations(monkeypatch)
    new_dec, new_pre = fresh(dec, 6), fresh(pre, 7)
    assert_matches(*new_dec.decode(), *new_dec.decode_ref())
    assert_matches(*new_pre.prefill(), *new_pre.prefill_ref())
    assert allocations == ["outputs", "outputs", "scratch", "scratch", "outputs", "outputs"]


def test_new_metadata_is_validated_and_recorded() -> None:
    """A strided view, another dtype or a bad tensor after a replay is established: a new key, checked."""
    case = make_case(16, [3, 70], page_size=16, dtype=DTYPE, fused=False)
    plan = case.plan_decode()
    plan.run(*case.queries())
    wide = make_case(16, [3, 70], page_size=16, dtype=DTYPE, fused=True)  # q and caches are strided views
    wide = wide.replace(kv_indptr=case.kv_indptr, kv_indices=case.kv_indices,
                        kv_last_page_len=case.kv_last_page_len)
    assert not wide.q_nope.is_contiguous()
    assert_matches(*plan.run(*wide.queries()), *wide.decode_ref())
    with pytest.raises(TypeError, match="q_pe"):
        plan.run(case.q_nope, case.q_pe.float(), case.ckv_cache, case.kpe_cache)
    with pytest.raises(TypeError, match="q_nope"):
        plan.run(case.q_nope.tolist(), case.q_pe, case.ckv_cache, case.kpe_cache)
    with pytest.raises(TypeError, match="q_nope"):
        tuner.mla_decode(case.q_nope.tolist(), case.q_pe, case.ckv_cache, case.kpe_cache, case.kv_indptr,
                         case.kv_indices, case.sm_scale, case.kv_last_page_len)


def test_one_call_plans_follow_the_dispatch(monkeypatch) -> None:
    case = make_case(16, [3, 70], page_size=16, dtype=DTYPE)
    case.decode()
    key = next(iter(decode._ONE_CALL._by_key))
    assert decode._ONE_CALL.get(key) is not None
    dispatch.reload()
    assert decode._ONE_CALL.get(key) is None, "reloading the dispatch tables empties the one-call caches"
    case.decode()
    monkeypatch.setenv("MLA_TUNER_GPU_KEY", "another-gpu")
    assert decode._ONE_CALL.get(key) is None, "so does a change of the environment that selects the tables"


@triton.jit
def _scale_copy(src_ptr, dst_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask) * factor, mask=mask)


def test_record_and_refusal() -> None:
    launch.make_recordable(sys.modules[__name__])
    src, dst = torch.randn(100), torch.zeros(100)

    def ours(tensors):
        _scale_copy[(4,)](tensors[0], tensors[1], 100, 2.0, BLOCK=32)

    replay = launch.record(lambda: ours((src, dst)), (src, dst))
    assert replay is not None and torch.equal(dst, src * 2)
    assert [step.grid for step in replay.steps] == [(4, 1, 1)], "a compiled kernel takes the grid as (x, y, z)"
    src2, dst2 = torch.randn(100), torch.zeros(100)
    replay((src2, dst2))
    assert torch.equal(dst2, src2 * 2), "the replay launches with the new tensors"
    assert torch.equal(dst, src * 2), "and leaves the recorded ones alone"

    def own_scratch():
        _scale_copy[(4,)](src, torch.empty(100), 100, 2.0, BLOCK=32)

    assert launch.record(own_scratch, (src, dst)) is None, "a tensor made inside launch() is never replayed"


def test_one_call_keys_tell_equal_values_of_other_types_apart() -> None:
    """True == 1 == 1.0: a cached plan for causal=True or sm_scale=1.0 must not let causal=1 or sm_scale=True
    skip validation."""
    dec = make_case(16, [3, 20], page_size=16, dtype=DTYPE, seed=8)
    pre = make_case(16, [40, 20], [7, 20], page_size=16, dtype=DTYPE, seed=9)
    dec.replace(sm_scale=1.0).decode()
    pre.prefill(causal=True)
    with pytest.raises(TypeError, match="sm_scale"):
        dec.replace(sm_scale=True).decode()
    with pytest.raises(TypeError, match="causal"):
        pre.prefill(causal=1)


def test_descriptors_are_rebuilt_only_for_another_base() -> None:
    """A replay's tensor descriptor over the same base tensor as the last call's is that call's descriptor
    (no rebuild per call); another base gets its own, and the template keeps no base."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    cache, other = torch.randn(4, 16, 64), torch.randn(4, 16, 64)
    template = launch._with_base(TensorDescriptor.from_tensor(cache, [1, 16, 64]), None)
    step = launch._Step(None, (1, 1, 1), ["x", template], [(0, 0, False), (1, 1, True)])
    q = torch.randn(3)
    first = step.arguments([q, cache])
    assert first[0] is q and first[1].base is cache and first[1].block_shape == [1, 16, 64]
    again = step.arguments([torch.randn(3), cache])
    assert again[1] is first[1], "the same base: the same descriptor"
    moved = step.arguments([q, other])
    assert moved[1] is not first[1] and moved[1].base is other and first[1].base is cache
    assert step.template[1].base is None
