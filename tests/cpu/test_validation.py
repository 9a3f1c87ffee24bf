"""Bad input (``docs/contract.md``, "Bad input"): each check raises a ValueError or TypeError whose
message starts with the argument's name and says what was expected and what was found.

The inputs are fp16 (the interpreter has no bf16 dot). A test that gives bad index *data* never lets a
kernel launch with it (under the interpreter that can segfault the test process): the ``no_launch``
fixture replaces the launch by an exception, so a check that regressed fails the test instead."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_case

from tuner import DecodeConfig, MLADecode, MLAPrefill, PrefillConfig, mla_decode, mla_prefill
from tuner.runtime import launch, paths, validate

TESTS_DIR = Path(__file__).resolve().parents[1]
Args = dict[str, Any]
Mutation = Callable[[Args], Args]

PAGE_SIZE = 16
KV_LENS = [5, 0, 20]  # pages [1, 0, 2]: kv_indptr [0, 1, 1, 3]
Q_LENS = [2, 0, 7]
DTYPE = torch.float16


class Launched(Exception):
    """Raised in place of a kernel launch by the ``no_launch`` fixture."""


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the launch of both forms (one-call and run()) by raising :class:`Launched`: a test then
    shows that a check raised before any launch, or (``pytest.raises(Launched)``) that input passed."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise Launched("the kernel would have been launched")

    monkeypatch.setattr(launch.LaunchPlan, "run", refuse)


def decode_args() -> Args:
    c = make_case(16, KV_LENS, page_size=PAGE_SIZE, dtype=DTYPE, seed=70)
    return dict(q_nope=c.q_nope, q_pe=c.q_pe, ckv_cache=c.ckv_cache, kpe_cache=c.kpe_cache,
                kv_indptr=c.kv_indptr, kv_indices=c.kv_indices, sm_scale=c.sm_scale,
                kv_last_page_len=c.kv_last_page_len)


def prefill_args() -> Args:
    c = make_case(16, KV_LENS, Q_LENS, page_size=PAGE_SIZE, dtype=DTYPE, seed=71)
    return dict(q_nope=c.q_nope, q_pe=c.q_pe, ckv_cache=c.ckv_cache, kpe_cache=c.kpe_cache,
                qo_indptr=c.qo_indptr, kv_indptr=c.kv_indptr, kv_indices=c.kv_indices, sm_scale=c.sm_scale,
                kv_last_page_len=c.kv_last_page_len)


FUNCTIONS = {"decode": (mla_decode, decode_args), "prefill": (mla_prefill, prefill_args)}


def setting(name: str, fn: Callable[[Any], Any]) -> Mutation:
    """A mutation that replaces argument ``name`` by ``fn(its value)``."""
    return lambda args: {**args, name: fn(args[name])}


def strided_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The same shape and values with stride 2 in the last dimension."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def int32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def with_outputs(out: Callable[[Args], torch.Tensor] | None = None,
                 lse: Callable[[Args], torch.Tensor] | None = None) -> Mutation:
    def mutate(args: Args) -> Args:
        rows, heads = args["q_nope"].shape[:2]
        extra = {"out": torch.empty(rows, heads, 512, dtype=DTYPE), "lse": torch.empty(rows, heads)}
        if out is not None:
            extra["out"] = out(args)
        if lse is not None:
            extra["lse"] = lse(args)
        return {**args, **extra}
    return mutate


def rows(args: Args) -> int:
    return args["q_nope"].shape[0]


# (id, mutation, exception, message pattern); every case applies to decode and to prefill.
COMMON: list[tuple[str, Mutation, type[Exception], str]] = [
    ("q_nope-float64", setting("q_nope", lambda t: t.double()), TypeError, r"^q_nope: expected dtype .*float64"),
    ("q_nope-int", setting("q_nope", lambda t: t.to(torch.int32)), TypeError, r"^q_nope: expected dtype"),
    ("q_nope-bool", setting("q_nope", lambda t: t.bool()), TypeError, r"^q_nope: expected dtype .*found torch.bool"),
    # the caches define the dtype: the message names the tensor that differs from them
    ("q_nope-float32", setting("q_nope", lambda t: t.float()), TypeError,
     r"^q_nope: expected dtype torch.float16 \(that of ckv_cache and kpe_cache\), found torch.float32"),
    ("q_pe-float32", setting("q_pe", lambda t: t.float()), TypeError,
     r"^q_pe: expected dtype torch.float16 \(that of ckv_cache and kpe_cache\), found torch.float32"),
    ("queries-float32", lambda a: {**a, "q_nope": a["q_nope"].float(), "q_pe": a["q_pe"].float()}, TypeError,
     r"^q_nope: expected dtype torch.float16 \(that of ckv_cache and kpe_cache\), found torch.float32"),
    ("caches-float32", lambda a: {**a, "ckv_cache": a["ckv_cache"].float(), "kpe_cache": a["kpe_cache"].float()},
     TypeError, r"^q_nope: expected dtype torch.float32 \(that of ckv_cache and kpe_cache\), found torch.float16"),
    ("ckv-dtype", setting("ckv_cache", lambda t: t.float()), TypeError,
     r"^kpe_cache: expected dtype torch.float32 \(that of ckv_cache\), found torch.float16"),
    ("kpe-dtype", setting("kpe_cache", lambda t: t.float()), TypeError,
     r"^kpe_cache: expected dtype torch.float16 \(that of ckv_cache\), found torch.float32"),
    ("kpe-bf16", setting("kpe_cache", lambda t: t.bfloat16()), TypeError,
     r"^kpe_cache: expected dtype torch.float16 \(that of ckv_cache\), found torch.bfloat16"),
    ("q_nope-list", setting("q_nope", lambda t: t.tolist()), TypeError, r"^q_nope: expected a torch.Tensor"),
    ("q_nope-rank", setting("q_nope", lambda t: t[0]), ValueError, r"^q_nope: expected 3 dimensions, found 2"),
    ("q_pe-rank", setting("q_pe", lambda t: t[None]), ValueError, r"^q_pe: expected 3 dimensions, found 4"),
    ("ckv-rank", setting("ckv_cache", lambda t: t[None]), ValueError, r"^ckv_cache: expected 3 dimensions"),
    ("kpe-rank", setting("kpe_cache", lambda t: t.flatten(0, 1)), ValueError, r"^kpe_cache: expected 3 dim"),
    ("q_pe-heads", setting("q_pe", lambda t: t[:, :8]), ValueError, r"^q_pe: expected shape \(\d+, 16, 64\)"),
    ("q_pe-rows", setting("q_pe", lambda t: t[:-1]), ValueError, r"^q_pe: expected shape"),
    ("ckv-width", setting("ckv_cache", lambda t: t[..., :256]), ValueError,
     r"^ckv_cache: expected shape \('?\*'?, 16, 512\), found \(\d+, 16, 256\)"),
    ("kpe-pages", setting("kpe_cache", lambda t: t[:-1]), ValueError, r"^kpe_cache: expected shape"),
    ("kpe-page-size", setting("kpe_cache", lambda t: t[:, :8]), ValueError, r"^kpe_cache: expected shape"),
    ("kpe-width", setting("kpe_cache", lambda t: t[..., :32]), ValueError, r"^kpe_cache: expected shape"),
    ("ckv-not-pow2", setting("q_nope", lambda t: t[..., :500]), ValueError, r"q_nope .*head_dim_ckv"),
    ("page-size-not-pow2", lambda a: {**a, "ckv_cache": a["ckv_cache"][:, :12],
                                      "kpe_cache": a["kpe_cache"][:, :12]}, ValueError, r"page_size"),
    ("q_nope-strided", setting("q_nope", strided_last_dim), ValueError, r"^q_nope: expected a contiguous last"),
    ("q_pe-strided", setting("q_pe", strided_last_dim), ValueError, r"^q_pe: expected a contiguous last"),
    ("ckv-strided", setting("ckv_cache", strided_last_dim), ValueError, r"^ckv_cache: expected a contiguous"),
    ("kpe-strided", setting("kpe_cache", strided_last_dim), ValueError, r"^kpe_cache: expected a contiguous"),
    ("kv_indptr-int64", setting("kv_indptr", lambda t: t.long()), TypeError,
     r"^kv_indptr: expected dtype torch.int32, found torch.int64"),
    ("kv_indices-int64", setting("kv_indices", lambda t: t.long()), TypeError, r"^kv_indices: expected dtype"),
    ("kv_last_page_len-int64", setting("kv_last_page_len", lambda t: t.long()), TypeError,
     r"^kv_last_page_len: expected dtype"),
    ("kv_indptr-float", setting("kv_indptr", lambda t: t.float()), TypeError, r"^kv_indptr: expected dtype"),
    ("kv_indptr-list", setting("kv_indptr", lambda t: t.tolist()), TypeError, r"^kv_indptr: expected a torch"),
    ("kv_indptr-short", setting("kv_indptr", lambda t: t[:-1]), ValueError,
     r"^(kv|qo)_indptr: expected shape \(4,\), found \(3,\)"),
    ("kv_indptr-long", setting("kv_indptr", lambda t: torch.cat([t, t[-1:]])), ValueError,
     r"^kv_indptr: expected shape \(4,\), found \(5,\)"),
    ("kv_last_page_len-short", setting("kv_last_page_len", lambda t: t[:-1]), ValueError,
     r"^kv_last_page_len: expected shape \(3,\), found \(2,\)"),
    ("kv_indices-rank", setting("kv_indices", lambda t: t[None]), ValueError, r"^kv_indices: expected 1 dim"),
    ("sm_scale-nan", setting("sm_scale", lambda _: float("nan")), ValueError, r"^sm_scale: expected a finite"),
    ("sm_scale-inf", setting("sm_scale", lambda _: float("inf")), ValueError, r"^sm_scale: expected a finite"),
    ("sm_scale-neg-inf", setting("sm_scale", lambda _: -float("inf")), ValueError, r"^sm_scale: .*finite"),
    ("sm_scale-tensor", setting("sm_scale", lambda s: torch.tensor(s)), TypeError, r"^sm_scale: expected a Py"),
    ("sm_scale-str", setting("sm_scale", lambda _: "0.1"), TypeError, r"^sm_scale: expected a float, found str"),
    ("sm_scale-none", setting("sm_scale", lambda _: None), TypeError, r"^sm_scale: expected a float"),
    ("out-shape", with_outputs(out=lambda a: torch.empty(rows(a), 16, 256)), ValueError,
     r"^out: expected shape \(\d+, 16, 512\)"),
    ("out-rows", with_outputs(out=lambda a: torch.empty(rows(a) + 1, 16, 512)), ValueError, r"^out: expected"),
    ("out-dtype", with_outputs(out=lambda a: torch.empty(rows(a), 16, 512)), TypeError,
     r"^out: expected dtype torch.float16, found torch.float32"),
    ("out-strided", with_outputs(out=lambda a: strided_last_dim(torch.empty(rows(a), 16, 512, dtype=DTYPE))),
     ValueError, r"^out: expected a contiguous last dimension"),
    ("lse-shape", with_outputs(lse=lambda a: torch.empty(rows(a), 8)), ValueError, r"^lse: expected shape"),
    ("lse-rank", with_outputs(lse=lambda a: torch.empty(rows(a), 16, 1)), ValueError, r"^lse: expected 2 dim"),
    ("lse-dtype", with_outputs(lse=lambda a: torch.empty(rows(a), 16, dtype=torch.float16)), TypeError,
     r"^lse: expected dtype torch.float32, found torch.float16"),
    ("lse-bf16", with_outputs(lse=lambda a: torch.empty(rows(a), 16, dtype=torch.bfloat16)), TypeError,
     r"^lse: expected dtype torch.float32"),
    # a second device is hard to get on a CPU-only machine; the meta device serves
    ("kv_indptr-device", setting("kv_indptr", lambda t: t.to("meta")), ValueError,
     r"^kv_indptr: expected device cpu, found meta"),
    ("kv_indices-device", setting("kv_indices", lambda t: t.to("meta")), ValueError, r"^kv_indices: .*device"),
    ("ckv-device", setting("ckv_cache", lambda t: t.to("meta")), ValueError, r"^ckv_cache: expected device"),
    ("out-device", with_outputs(out=lambda a: torch.empty(rows(a), 16, 512, dtype=DTYPE, device="meta")), ValueError,
     r"^out: expected device cpu, found meta"),
]

# validate_data=True: checks that need the index data on the host.
HOST_DATA: list[tuple[str, Mutation, str]] = [
    ("indptr-not-zero", setting("kv_indptr", lambda _: int32(1, 1, 1, 3)),
     r"^kv_indptr: expected to start at 0, found 1"),
    ("indptr-decreasing", setting("kv_indptr", lambda _: int32(0, 2, 1, 3)),
     r"^kv_indptr: expected non-decreasing values, found 2 then 1"),
    ("indptr-past-indices", setting("kv_indptr", lambda _: int32(0, 1, 1, 4)),
     r"^kv_indptr: last value 4 exceeds the length of kv_indices \(3\)"),
    ("page-id-too-large", lambda a: {**a, "kv_indices": int32(a["ckv_cache"].shape[0], 0, 1)},
     r"^kv_indices: expected page ids in \[0, \d+\), found \d+"),
    ("page-id-negative", setting("kv_indices", lambda t: torch.cat([t[:1], int32(-1), t[2:]])),
     r"^kv_indices: expected page ids (in \[0, \d+\)|>= 0), found -1 at position 1"),
    ("last-page-len-zero", setting("kv_last_page_len", lambda _: int32(0, 0, 4)),
     r"^kv_last_page_len: expected values in \[1, 16\] .*found 0 at sequence 0"),
    ("last-page-len-too-large", setting("kv_last_page_len", lambda _: int32(5, 0, 17)),
     r"^kv_last_page_len: expected values in \[1, 16\] .*found 17 at sequence 2"),
]


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.parametrize(("mutate", "error", "pattern"), [c[1:] for c in COMMON], ids=[c[0] for c in COMMON])
def test_bad_input(kind: str, mutate: Mutation, error: type[Exception], pattern: str, no_launch: None) -> None:
    fn, make_args = FUNCTIONS[kind]
    with pytest.raises(error, match=pattern):
        fn(**mutate(make_args()))


@pytest.mark.parametrize("kind", list(FUNCTIONS))
@pytest.mark.parametrize(("mutate", "pattern"), [c[1:] for c in HOST_DATA], ids=[c[0] for c in HOST_DATA])
def test_bad_host_data(kind: str, mutate: Mutation, pattern: str, no_launch: None) -> None:
    fn, make_args = FUNCTIONS[kind]
    args = mutate(make_args())
    with pytest.raises(ValueError, match=pattern):
        fn(**args, validate_data=True)


def test_good_input_passes_validation() -> None:
    """The unmutated arguments are accepted, so each failure above is due to its one change."""
    for fn, make_args in FUNCTIONS.values():
        fn(**make_args(), validate_data=True)


PREFILL_ONLY: list[tuple[str, Mutation, type[Exception], str]] = [
    ("qo_indptr-int64", setting("qo_indptr", lambda t: t.long()), TypeError,
     r"^qo_indptr: expected dtype torch.int32"),
    ("qo_indptr-list", setting("qo_indptr", lambda t: t.tolist()), TypeError, r"^qo_indptr: expected a torch"),
    ("qo_indptr-long", setting("qo_indptr", lambda t: torch.cat([t, t[-1:]])), ValueError,
     r"^(kv|qo)_indptr: expected shape \(5,\), found \(4,\)"),
    ("qo_indptr-empty", setting("qo_indptr", lambda t: t[:0]), ValueError, r"^qo_indptr: expected at least one"),
    ("qo_indptr-device", setting("qo_indptr", lambda t: t.to("meta")), ValueError,
     r"^qo_indptr: expected device cpu"),
    ("causal-int", lambda a: {**a, "causal": 1}, TypeError, r"^causal: expected a bool, found int"),
]


@pytest.mark.parametrize(("mutate", "error", "pattern"), [c[1:] for c in PREFILL_ONLY],
                         ids=[c[0] for c in PREFILL_ONLY])
def test_bad_prefill_input(mutate: Mutation, error: type[Exception], pattern: str, no_launch: None) -> None:
    with pytest.raises(error, match=pattern):
        mla_prefill(**mutate(prefill_args()))


PREFILL_HOST_DATA: list[tuple[str, Mutation, str]] = [
    ("qo-not-zero", setting("qo_indptr", lambda _: int32(1, 2, 2, 9)), r"^qo_indptr: expected to start at 0"),
    ("qo-decreasing", setting("qo_indptr", lambda _: int32(0, 3, 2, 9)), r"^qo_indptr: expected non-decreasing"),
    ("q-len-past-kv-len", setting("qo_indptr", lambda _: int32(0, 6, 6, 9)),
     r"^qo_indptr: sequence 0 has q_len 6 > kv_len 5"),
    ("q-for-empty-sequence", setting("qo_indptr", lambda _: int32(0, 2, 3, 9)),
     r"^qo_indptr: sequence 1 has q_len 1 > kv_len 0"),
    # qo_indptr[-1] must equal q_nope's row count (the kernel indexes q_nope and out by it; more rows
    # than q_nope has is also tested in a subprocess below, since the launch reads out of bounds)
    ("qo-total-short-of-rows", setting("qo_indptr", lambda _: int32(0, 2, 2, 6)),
     r"^qo_indptr: expected the last value to equal the rows of q_nope \(9\), found 6"),
]


@pytest.mark.parametrize(("mutate", "pattern"), [c[1:] for c in PREFILL_HOST_DATA],
                         ids=[c[0] for c in PREFILL_HOST_DATA])
def test_bad_prefill_host_data(mutate: Mutation, pattern: str, no_launch: None) -> None:
    with pytest.raises(ValueError, match=pattern):
        mla_prefill(**mutate(prefill_args()), validate_data=True)


def test_qo_indptr_past_the_query_rows_is_refused() -> None:
    """validate_data=True with qo_indptr[-1] (12) > q_nope's rows (9) must raise a ValueError naming
    qo_indptr before any launch. Run in a subprocess: without the check, the kernel reads and writes
    past the end of q_nope/out and can crash the interpreter."""
    code = textwrap.dedent("""
        import os, sys
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sys.path[:0] = [%r, %r]
        import torch
        from helpers import make_case
        from tuner import mla_prefill
        c = make_case(16, %r, %r, page_size=%d, dtype=torch.float16)
        qo = torch.tensor([0, 2, 2, 12], dtype=torch.int32)
        try:
            mla_prefill(c.q_nope, c.q_pe, c.ckv_cache, c.kpe_cache, qo, c.kv_indptr, c.kv_indices,
                        c.sm_scale, c.kv_last_page_len, validate_data=True)
        except ValueError as err:
            print(f"ValueError: {err}")
            raise SystemExit(0 if str(err).startswith("qo_indptr") else 3)
        print("no error raised")
        raise SystemExit(2)
    """) % (str(TESTS_DIR), str(TESTS_DIR.parent), KV_LENS, Q_LENS, PAGE_SIZE)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"


def test_plan_checks_host_data() -> None:
    """plan() has the host copy: it validates the index data by default, pages against num_pages."""
    c = make_case(16, KV_LENS, page_size=PAGE_SIZE, dtype=DTYPE, seed=72)
    common = dict(num_heads=16, page_size=PAGE_SIZE, sm_scale=c.sm_scale)
    with pytest.raises(ValueError, match=r"^kv_indices: expected page ids in \[0, 2\)"):
        MLADecode().plan(c.kv_indptr, c.kv_indices, c.kv_last_page_len, num_pages=2, **common)
    with pytest.raises(ValueError, match=r"^kv_indptr: expected non-decreasing"):
        MLADecode().plan(int32(0, 2, 1, 3), c.kv_indices, c.kv_last_page_len, **common)
    with pytest.raises(ValueError, match=r"^kv_last_page_len: expected values"):
        MLADecode().plan(c.kv_indptr, c.kv_indices, int32(0, 0, 4), **common)
    with pytest.raises(ValueError, match=r"^kv_indptr: expected at least one element"):
        MLADecode().plan(int32(), c.kv_indices, None, **common)
    with pytest.raises(ValueError, match=r"^sm_scale"):
        MLADecode().plan(c.kv_indptr, c.kv_indices, c.kv_last_page_len, **{**common, "sm_scale": float("nan")})


def test_run_checks_metadata() -> None:
    c = make_case(16, KV_LENS, page_size=PAGE_SIZE, dtype=DTYPE, seed=73)
    plan = c.plan_decode()
    with pytest.raises(ValueError, match=r"^q_nope: expected shape \(3, 16, 512\), found \(2, 16, 512\)"):
        plan.run(c.q_nope[:2], c.q_pe[:2], c.ckv_cache, c.kpe_cache)
    with pytest.raises(TypeError, match=r"^q_pe: expected dtype torch.float16 .*found torch.float32"):
        plan.run(c.q_nope, c.q_pe.float(), c.ckv_cache, c.kpe_cache)
    with pytest.raises(TypeError, match=r"^q_nope: expected dtype torch.float16 .*found torch.float32"):
        plan.run(c.q_nope.float(), c.q_pe, c.ckv_cache, c.kpe_cache)
    with pytest.raises(ValueError, match=r"^out: expected shape"):
        plan.run(*c.queries(), out=torch.empty(3, 16, 256))


def test_config_that_cannot_run_the_spec() -> None:
    c = make_case(16, KV_LENS, Q_LENS, page_size=PAGE_SIZE, dtype=DTYPE, seed=74)
    with pytest.raises(ValueError, match=r"block_h: expected at most 16 for 16 heads, found 64"):
        mla_decode(**decode_args(), config=DecodeConfig(block_h=64))
    with pytest.raises(ValueError, match=r"merge_block_d: expected at most head_dim_ckv=512"):
        mla_decode(**decode_args(), config=DecodeConfig(merge_block_d=1024))
    with pytest.raises(ValueError, match=r"block_h: expected at most 16"):
        c.prefill(True, config=PrefillConfig(block_m=1, block_h=32))


# --- plan() / run(): the page ids and qo_indptr[-1] that plan() read, against what run() is given ---

Plan = MLADecode | MLAPrefill


def plan_for(kind: str, args: Args, **kwargs: Any) -> Plan:
    """Plan ``args``' layout as the README does (no num_pages unless given in ``kwargs``)."""
    common = dict(num_heads=16, page_size=PAGE_SIZE, sm_scale=args["sm_scale"], **kwargs)
    if kind == "decode":
        return MLADecode().plan(args["kv_indptr"], args["kv_indices"], args["kv_last_page_len"], **common)
    return MLAPrefill().plan(args["qo_indptr"], args["kv_indptr"], args["kv_indices"], args["kv_last_page_len"],
                             **common)


def run_planned(plan: Plan, args: Args, **changes: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = {**args, **changes}
    return plan.run(a["q_nope"], a["q_pe"], a["ckv_cache"], a["kpe_cache"])


def first_pages(args: Args, n: int) -> Args:
    """Both caches cut to their first ``n`` pages."""
    return {"ckv_cache": args["ckv_cache"][:n], "kpe_cache": args["kpe_cache"][:n]}


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_run_checks_page_ids_planned_without_num_pages(kind: str, no_launch: None) -> None:
    """plan() without num_pages (the README's call) records the largest page id; run() compares it with
    the cache it is given (shape[0]) and names kv_indices. No kernel ever sees the bad page id."""
    args = FUNCTIONS[kind][1]()
    top = int(args["kv_indices"].max())
    assert top >= 1
    plan = plan_for(kind, args)
    with pytest.raises(ValueError, match=rf"^kv_indices: expected page ids in \[0, {top}\), found {top} \(the "
                                         rf"largest page id at plan\(\); ckv_cache and kpe_cache have {top} pages\)"):
        run_planned(plan, args, **first_pages(args, top))
    with pytest.raises(Launched):  # a cache that holds page `top` is fine
        run_planned(plan, args, **first_pages(args, top + 1))
    # num_pages= still checks at plan() already
    with pytest.raises(ValueError, match=rf"^kv_indices: expected page ids in \[0, {top}\), found {top} at position"):
        plan_for(kind, args, num_pages=top)
    with pytest.raises(Launched):
        run_planned(plan_for(kind, args, num_pages=top + 1), args)
    # validate_data=False skips every data check, this one included (documented)
    with pytest.raises(Launched):
        run_planned(plan_for(kind, args, validate_data=False), args, **first_pages(args, top))


def test_plan_without_num_pages_refuses_negative_page_ids() -> None:
    args = decode_args()
    args["kv_indices"] = torch.cat([args["kv_indices"][:1], int32(-1), args["kv_indices"][2:]])
    with pytest.raises(ValueError, match=r"^kv_indices: expected page ids >= 0, found -1 at position 1"):
        plan_for("decode", args)


PLAN_HOST_DATA = [(f"{kind}-{c[0]}", kind, c[1], c[2]) for kind in FUNCTIONS for c in HOST_DATA] + [
    (f"prefill-{c[0]}", "prefill", c[1], c[2]) for c in PREFILL_HOST_DATA if c[0] != "qo-total-short-of-rows"]


@pytest.mark.parametrize(("kind", "mutate", "pattern"), [c[1:] for c in PLAN_HOST_DATA],
                         ids=[c[0] for c in PLAN_HOST_DATA])
def test_plan_and_run_refuse_bad_host_data(kind: str, mutate: Mutation, pattern: str, no_launch: None) -> None:
    """Every host-data check holds for plan() + run() too, before any launch (plan without num_pages:
    an out-of-range page id is caught by run())."""
    args = mutate(FUNCTIONS[kind][1]())
    with pytest.raises(ValueError, match=pattern):
        run_planned(plan_for(kind, args), args)


def test_plan_and_run_accept_good_host_data(no_launch: None) -> None:
    """The control of the test above: the unmutated layouts plan and reach the launch."""
    for kind, (_, make_args) in FUNCTIONS.items():
        args = make_args()
        with pytest.raises(Launched):
            run_planned(plan_for(kind, args), args)


# --- qo_indptr[-1] against q_nope's rows ---

@pytest.mark.parametrize("last", [6, 12], ids=["fewer", "more"])
def test_one_call_prefill_checks_total_q_on_the_host(last: int, no_launch: None) -> None:
    """qo_indptr[-1] != rows of q_nope (9): fewer left rows unwritten (NaN), more read past q_nope. On
    host tensors the one-call form compares them without validate_data (reading a CPU tensor is no sync)."""
    args = prefill_args()
    with pytest.raises(ValueError, match=rf"^qo_indptr: expected the last value to equal the rows of q_nope \(9\), "
                                         rf"found {last}$"):
        mla_prefill(**{**args, "qo_indptr": int32(0, 2, 2, last)})
    with pytest.raises(Launched):
        mla_prefill(**args)


def test_run_checks_rows_against_planned_qo_indptr(no_launch: None) -> None:
    args = prefill_args()
    plan = plan_for("prefill", {**args, "qo_indptr": int32(0, 2, 2, 6)})
    with pytest.raises(ValueError, match=r"^q_nope: expected 6 rows \(qo_indptr\[-1\] at plan\(\)\), found 9$"):
        run_planned(plan, args)
    with pytest.raises(Launched):
        run_planned(plan, args, q_nope=args["q_nope"][:6], q_pe=args["q_pe"][:6])


# --- no host reads in the launch path ---

HOST_READS = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_run_reads_no_tensor_data(kind: str, monkeypatch: pytest.MonkeyPatch, no_launch: None) -> None:
    """run() checks metadata only (CUDA-graph capturable): with every way of reading a tensor's data on
    the host disabled, it still reaches the launch, also with MLA_TUNER_VALIDATE set (it affects plan only)."""
    args = FUNCTIONS[kind][1]()
    plan = plan_for(kind, args)
    monkeypatch.setenv(paths.ENV_VALIDATE, "1")

    def forbidden(name: str) -> Callable[..., Any]:
        def read(*_: object, **__: object) -> Any:
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    with pytest.raises(AssertionError, match="host read"):  # the guard works
        bool(args["kv_indptr"][0] == 0)
    with pytest.raises(Launched):
        run_planned(plan, args)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_one_call_reads_no_index_data_off_the_host(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                   no_launch: None) -> None:
    """Without validation, the one-call forms read no index data of tensors on a device (the meta device
    stands in for a GPU: reading it raises), so they stay graph-capturable; with it they must."""
    fn, make_args = FUNCTIONS[kind]
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make_args().items()}
    monkeypatch.delenv(paths.ENV_VALIDATE, raising=False)
    with pytest.raises(Launched):
        fn(**args)
    with pytest.raises(Exception) as info:  # the control: validation reads the data
        fn(**args, validate_data=True)
    assert not isinstance(info.value, Launched)


# --- the MLA_TUNER_VALIDATE switch ---

@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("1", True), ("yes", True)])
def test_validate_switch_values(value: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.ENV_VALIDATE, value)
    assert validate.data_validation(False) is on
    assert validate.data_validation(True)


def test_validate_switch_turns_on_validation_everywhere(monkeypatch: pytest.MonkeyPatch, no_launch: None) -> None:
    dec = decode_args()
    dec["kv_indices"] = int32(dec["ckv_cache"].shape[0], 0, 1)  # page id out of range
    pre = {**prefill_args(), "kv_indptr": int32(0, 2, 1, 3)}  # decreasing
    monkeypatch.setenv(paths.ENV_VALIDATE, "0")
    with pytest.raises(Launched):  # off: the one-call forms do not look at the data
        mla_decode(**dec)
    with pytest.raises(Launched):
        mla_prefill(**pre)
    plan_for("decode", pre, validate_data=False)
    monkeypatch.setenv(paths.ENV_VALIDATE, "1")
    with pytest.raises(ValueError, match=r"^kv_indices: expected page ids in \[0, \d+\), found \d+"):
        mla_decode(**dec)
    with pytest.raises(ValueError, match=r"^kv_indptr: expected non-decreasing values"):
        mla_prefill(**pre)
    with pytest.raises(ValueError, match=r"^kv_indptr: expected non-decreasing values"):
        plan_for("decode", pre, validate_data=False)
    with pytest.raises(ValueError, match=r"^kv_indptr: expected non-decreasing values"):
        plan_for("prefill", pre, validate_data=False)
    plan = plan_for("decode", decode_args(), validate_data=False)  # the run-time page bound is kept too
    with pytest.raises(ValueError, match=r"^kv_indices: expected page ids in"):
        run_planned(plan, decode_args(), **first_pages(decode_args(), 1))


# --- float32: a test dtype of the interpreter, refused on a GPU ---

def test_float32_is_allowed_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.ENV_TRITON_INTERPRET, "0")
    assert not validate.float32_allowed(torch.device("cuda"))
    assert validate.float32_allowed(torch.device("cpu"))
    monkeypatch.setenv(paths.ENV_TRITON_INTERPRET, "1")
    assert validate.float32_allowed(torch.device("cuda"))


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_float32_on_a_gpu_is_refused(kind: str, monkeypatch: pytest.MonkeyPatch, no_launch: None) -> None:
    fn, make_args = FUNCTIONS[kind]
    fp32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in make_args().items()}
    with pytest.raises(Launched):  # accepted under the interpreter
        fn(**fp32)
    plan = plan_for(kind, fp32)
    monkeypatch.setattr(validate, "float32_allowed", lambda device: False)  # as on a GPU
    launch.forget_plans()  # which never accepted these tensors: forget the one-call plan made above
    gpu = r"expected dtype torch.bfloat16 or torch.float16 on a GPU \(torch.float32 is a test dtype"
    with pytest.raises(TypeError, match=rf"^q_nope: {gpu}.*found torch.float32"):
        fn(**fp32)
    with pytest.raises(TypeError, match=rf"^q_nope: {gpu}.*found torch.float32"):
        run_planned(plan, fp32)
    with pytest.raises(TypeError, match=rf"^ckv_cache: {gpu}.*found torch.float32"):
        fn(**{**make_args(), "ckv_cache": fp32["ckv_cache"], "kpe_cache": fp32["kpe_cache"]})
    with pytest.raises(Launched):  # fp16 is unaffected
        fn(**make_args())
