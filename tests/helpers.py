"""Shared test utilities: random paged batches built for the edge cases of ``docs/contract.md``,
the contract's tolerances, and poisoned output buffers.

Every case is random normal data (never zeros). Cache pages that no sequence uses, and the unused
slots of each partial last page, are NaN: a kernel that reads a wrong page or slot shows it.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import tuner
from tuner.harness.check import TOLERANCES, Tolerance, check  # noqa: F401  (TOLERANCES: for the tests)
from tuner.harness.inputs import Inputs, fp8_scale, quantize_fp8
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref

Outputs = tuple[torch.Tensor, torch.Tensor]


def assert_matches(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor,
                   tol: Tolerance | None = None, what: str = "") -> None:
    """Check a kernel's (out [R, H, ckv], lse [R, H] float32) against the float32 reference by the
    project's one correctness rule (:func:`tuner.harness.check.check`), shapes and dtypes exactly."""
    label = f"{what}: " if what else ""
    assert out.shape == ref_out.shape, f"{label}out shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    assert lse.shape == ref_lse.shape, f"{label}lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    assert lse.dtype == torch.float32, f"{label}lse dtype {lse.dtype}"
    verdict = check(out, lse, ref_out, ref_lse, tol)
    assert verdict.passed, label + verdict.reason


@dataclass
class Case(Inputs):
    """One random paged batch: the arguments of ``mla_decode`` / ``mla_prefill`` (``tuner.harness.inputs.Inputs``)
    plus the lengths they were made from, and the calls the tests make on them.

    q_nope [R, H, ckv], q_pe [R, H, kpe] (R = batch for decode, sum(q_lens) for prefill);
    ckv_cache [P, page_size, ckv], kpe_cache [P, page_size, kpe]; int32 kv_indptr [B + 1],
    kv_indices [kv_indptr[-1]], kv_last_page_len [B] or None here, qo_indptr [B + 1] or None.
    """

    kv_lens: tuple[int, ...] = ()
    q_lens: tuple[int, ...] | None = None

    @property
    def num_heads(self) -> int:
        return self.q_nope.shape[1]

    @property
    def page_size(self) -> int:
        return self.ckv_cache.shape[1]

    @property
    def head_dims(self) -> dict[str, int]:
        return {"head_dim_ckv": self.q_nope.shape[2], "head_dim_kpe": self.q_pe.shape[2]}

    def replace(self, **changes: Any) -> Case:
        return replace(self, **changes)

    def with_query(self, seed: int) -> Case:
        """The same layout with fresh random queries."""
        g = _generator(self.q_nope.device, seed)
        return replace(self, q_nope=_randn(self.q_nope.shape, self.q_nope.dtype, g, self.q_nope.device),
                       q_pe=_randn(self.q_pe.shape, self.q_pe.dtype, g, self.q_pe.device))

    @property
    def kv_dtype(self) -> dict[str, torch.dtype]:
        """``{"kv_dtype": float8_e4m3fn}`` for an fp8 cache (plan()'s keyword), ``{}`` for a 16-bit one."""
        return {"kv_dtype": self.ckv_cache.dtype} if self.ckv_cache.dtype == torch.float8_e4m3fn else {}

    def decode(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return tuner.mla_decode(self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.kv_indptr,
                                self.kv_indices, self.sm_scale, self.kv_last_page_len, **{**self.scales, **kwargs})

    def prefill(self, causal: bool = True, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.qo_indptr is not None, "a decode case has no qo_indptr"
        return tuner.mla_prefill(self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.qo_indptr,
                                 self.kv_indptr, self.kv_indices, self.sm_scale, self.kv_last_page_len,
                                 causal=causal, **{**self.scales, **kwargs})

    def decode_ref(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_decode_ref(self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.kv_indptr,
                              self.kv_indices, self.sm_scale, self.kv_last_page_len, **self.scales)

    def prefill_ref(self, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.qo_indptr is not None, "a decode case has no qo_indptr"
        return mla_prefill_ref(self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.qo_indptr,
                               self.kv_indptr, self.kv_indices, self.sm_scale, self.kv_last_page_len,
                               causal=causal, **self.scales)

    def plan_decode(self, **kwargs: Any) -> tuner.MLADecode:
        return tuner.MLADecode().plan(
            self.kv_indptr, self.kv_indices, self.kv_last_page_len, num_heads=self.num_heads,
            page_size=self.page_size, sm_scale=self.sm_scale, num_pages=self.ckv_cache.shape[0],
            **self.head_dims, **{**self.kv_dtype, **kwargs})

    def plan_prefill(self, causal: bool = True, **kwargs: Any) -> tuner.MLAPrefill:
        assert self.qo_indptr is not None, "a decode case has no qo_indptr"
        return tuner.MLAPrefill().plan(
            self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_last_page_len,
            num_heads=self.num_heads, page_size=self.page_size, sm_scale=self.sm_scale, causal=causal,
            num_pages=self.ckv_cache.shape[0], **self.head_dims, **{**self.kv_dtype, **kwargs})

    def quantized(self, ckv_scale: float | None = None, kpe_scale: float | None = None) -> Case:
        """The same batch over an fp8 (float8_e4m3fn) cache: each cache divided by its per-tensor scale
        (default: its largest finite magnitude / 448) and rounded to fp8; NaN slots stay NaN. The
        reference then reads the dequantized cache, ``fp8 * scale``. A fused cache (two column views of one
        tensor) stays fused: one fp8 tensor, one scale for both."""
        ckv, kpe = self.ckv_cache, self.kpe_cache
        if ckv.untyped_storage().data_ptr() == kpe.untyped_storage().data_ptr():  # fused views
            base = ckv.as_strided((ckv.shape[0], ckv.shape[1], ckv.stride(1)), ckv.stride(), ckv.storage_offset())
            scale = ckv_scale or fp8_scale(ckv, kpe)
            base8 = quantize_fp8(base, scale)
            width = ckv.shape[2]
            return replace(self, ckv_cache=base8[..., :width], kpe_cache=base8[..., width:], ckv_scale=scale,
                           kpe_scale=scale)
        ckv_scale = ckv_scale or fp8_scale(ckv)
        kpe_scale = kpe_scale or fp8_scale(kpe)
        return replace(self, ckv_cache=quantize_fp8(ckv, ckv_scale), kpe_cache=quantize_fp8(kpe, kpe_scale),
                       ckv_scale=ckv_scale, kpe_scale=kpe_scale)

    def queries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_nope, q_pe, ckv_cache, kpe_cache): the arguments of a planned ``run()``."""
        return self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, g: torch.Generator,
           device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def _int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def make_case(heads: int, kv_lens: list[int] | tuple[int, ...], q_lens: list[int] | tuple[int, ...] | None = None,
              *, page_size: int = 1, ckv: int = 512, kpe: int = 64, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", seed: int = 0, spare_pages: int = 3,
              last_page_len: bool = True, fused: bool = False, num_pages: int | None = None,
              top_pages: bool = False) -> Case:
    """A random batch (decode when ``q_lens`` is None, else prefill with those query counts).

    Page ids are a random permutation drawn from the cache's pages (``spare_pages`` more than used, or
    ``num_pages`` in all); with ``top_pages`` they come from the highest page ids. Unused pages and the
    unused slots of partial last pages are NaN. ``last_page_len=False`` passes None (every page full;
    then every kv length must be a multiple of page_size). ``fused`` makes the caches and queries
    views [..., :ckv] and [..., ckv:] of one (ckv + kpe)-wide tensor. Empty sequences get
    kv_last_page_len 0 (FlashInfer's convention; the value is ignored without pages).
    """
    device = torch.device(device)
    kv_lens = tuple(int(n) for n in kv_lens)
    pages = [-(-n // page_size) for n in kv_lens]
    used = sum(pages)
    total = num_pages if num_pages is not None else used + spare_pages
    assert total >= used, f"num_pages {total} < pages used {used}"
    g_host = torch.Generator().manual_seed(seed)
    if top_pages:
        pool = min(total, used + spare_pages)
        ids = (total - pool) + torch.randperm(pool, generator=g_host)[:used]
    else:
        ids = torch.randperm(total, generator=g_host)[:used]
    indptr = list(itertools.accumulate(pages, initial=0))
    partial = [(int(ids[indptr[b + 1] - 1]), n % page_size) for b, n in enumerate(kv_lens) if n % page_size]
    ids = ids.to(device=device, dtype=torch.int64)
    g = _generator(device, seed)

    def paged(width: int) -> torch.Tensor:
        cache = torch.full((total, page_size, width), float("nan"), dtype=dtype, device=device)
        if used:
            cache[ids] = _randn((used, page_size, width), dtype, g, device)
        for page, slot in partial:
            cache[page, slot:] = float("nan")
        return cache

    if fused:
        cache = paged(ckv + kpe)
        cache_ckv, cache_kpe = cache[..., :ckv], cache[..., ckv:]
    else:
        cache_ckv, cache_kpe = paged(ckv), paged(kpe)

    if last_page_len:
        last = _int32([(n - 1) % page_size + 1 if n else 0 for n in kv_lens], device)
    else:
        assert all(n % page_size == 0 for n in kv_lens), "kv_last_page_len=None needs full pages"
        last = None
    rows = len(kv_lens) if q_lens is None else sum(q_lens)
    q = _randn((rows, heads, ckv + kpe), dtype, g, device)
    q_nope, q_pe = q[..., :ckv], q[..., ckv:]
    if not fused:
        q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    qo = None
    if q_lens is not None:
        assert len(q_lens) == len(kv_lens), "q_lens and kv_lens differ in length"
        qo = _int32(list(itertools.accumulate(q_lens, initial=0)), device)
    return Case(q_nope=q_nope, q_pe=q_pe, ckv_cache=cache_ckv, kpe_cache=cache_kpe,
                kv_indptr=_int32(indptr, device), kv_indices=ids.to(torch.int32), kv_last_page_len=last,
                qo_indptr=qo, kv_lens=kv_lens, q_lens=None if q_lens is None else tuple(q_lens))


def poisoned_outputs(rows: int, heads: int, ckv: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """out [rows, heads, ckv] and lse [rows, heads] float32, filled with NaN (a row left unwritten shows)."""
    out = torch.full((rows, heads, ckv), float("nan"), dtype=dtype, device=device)
    lse = torch.full((rows, heads), float("nan"), dtype=torch.float32, device=device)
    return out, lse


def fresh(case: Case, seed: int) -> Case:
    """The same layout with new queries and new cache values (new tensors, same metadata; NaN stays NaN)."""
    g = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor) -> torch.Tensor:
        new = torch.randn(t.shape, generator=g).to(t.dtype)
        return new.masked_fill(t.isnan(), float("nan"))

    return case.with_query(seed).replace(ckv_cache=like(case.ckv_cache), kpe_cache=like(case.kpe_cache))


def forbid(monkeypatch: Any, *targets: tuple[Any, str]) -> None:
    """Make each (object, attribute) raise when called: a replayed call must not reach it."""
    for obj, name in targets:
        def boom(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            raise AssertionError(f"a replayed call reached {_name}")
        monkeypatch.setattr(obj, name, boom)


def count_runtime_allocations(monkeypatch: Any) -> list[str]:
    """torch.empty calls made from tuner/runtime (their callers' function names), from now on."""
    from tuner.runtime import loader

    runtime = str(loader.__file__).rsplit("/", 1)[0]
    calls: list[str] = []
    real = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(runtime):
            calls.append(frame.f_code.co_name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return calls


def skewed_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n serving-like lengths: lognormal around the geometric middle of [lo, hi], clipped to it."""
    g = torch.Generator().manual_seed(seed)
    mid = math.sqrt(lo * hi)
    x = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 0.9 + math.log(mid))
    return [int(v) for v in x.clamp(lo, hi).round()]


def capture(fn: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Warm ``fn`` up on a side stream, then capture one call in a CUDA graph: (graph, its result)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


_FRESH_SEEDS = itertools.count(999)


def check_graph_replay(case: Case, call: Callable[[], Outputs], eager: Callable[[], Outputs],
                       reference: Callable[[], Outputs]) -> None:
    """Capture ``call()`` and replay it: the result equals ``eager()`` bit for bit. Then overwrite the
    case's q_nope/q_pe in place and replay again: equal to ``eager()`` on the new values, and within
    tolerance of ``reference()``."""
    want = [t.clone() for t in eager()]
    graph, result = capture(call)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(result[0], want[0]) and torch.equal(result[1], want[1]), "replay differs from eager"
    before = result[0].clone()
    fresh = case.with_query(seed=next(_FRESH_SEEDS))  # new values on every call, never the last ones
    case.q_nope.copy_(fresh.q_nope)
    case.q_pe.copy_(fresh.q_pe)
    graph.replay()
    want = eager()
    torch.cuda.synchronize()
    assert not torch.equal(result[0], before), "the replay did not read the new q"
    assert torch.equal(result[0], want[0]) and torch.equal(result[1], want[1]), "replay on new q differs"
    assert_matches(result[0], result[1], *reference())


def check_installed(site: str | Path) -> None:
    """Check that ``import tuner`` is the copy installed in ``site`` (a site-packages folder) and that
    it works without a checkout: its generated kernels ship inside the package and run (a tiny decode
    and prefill under the Triton interpreter when there is no GPU), and a shape outside the catalogue
    fails with advice instead of rendering (an install has no templates). Set MLA_TUNER_CACHE_DIR to
    an empty folder first. Used by tests/cpu/test_install.py and .ci/run."""
    from tuner.runtime import loader, paths

    package = Path(tuner.__file__).resolve().parent
    assert package == Path(site).resolve() / "tuner", f"expected the copy in {site}, found {package}"
    assert paths.generated_dir() == package / "generated", paths.generated_dir()
    shipped = {p.stem for p in paths.generated_dir().glob("mla_paged_*.py")}
    assert shipped == {spec.name() for spec in tuner.catalogue()}, "the catalogue's modules are installed"
    assert not paths.templates_dir().exists(), f"templates found in an install: {paths.templates_dir()}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(16, [5, 40, 0], page_size=16, device=device, seed=1)
    assert_matches(*case.decode(), *case.decode_ref(), what="installed decode")
    case = make_case(16, [5, 40], [5, 3], page_size=1, device=device, seed=2)
    assert_matches(*case.prefill(), *case.prefill_ref(), what="installed prefill")
    try:
        loader.load_module(tuner.MLASpec("decode", 24, 512, 64, 16))
    except FileNotFoundError as err:
        assert "mla-tune generate" in str(err), err
    else:
        raise AssertionError("a shape outside the catalogue should need the templates")
    print(f"installed package OK: {package} with {len(shipped)} generated kernels")


def own_generated_dir(tmp_path: Path, monkeypatch: Any) -> Path:
    """Point the runtime at a generated/ folder of the test's own (``MLA_TUNER_GENERATED_DIR``): the committed
    modules linked into it and an empty ``dispatch/`` for the test's tables; the dispatch caches forgotten."""
    from tuner.runtime import dispatch, paths

    root = tmp_path / "generated"
    (root / "dispatch").mkdir(parents=True)
    for module in (Path(__file__).resolve().parents[1] / "generated").glob("mla_paged_*.py"):
        (root / module.name).symlink_to(module)
    monkeypatch.setenv(paths.ENV_GENERATED_DIR, str(root))
    dispatch.reload()
    return root


def tuned_entry(config: Any, of: Any, **fields: Any) -> Any:
    """A dispatch entry for ``config`` tuned on ``of``'s module as it is now (``fields`` override)."""
    from tuner.runtime import dispatch
    from tuner.runtime.loader import module_hash

    data = dict(config=config, time_us=10.0, default_time_us=12.0, kernel_hash=module_hash(of), trials=12,
                versions={"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"})
    data.update(fields)
    return dispatch.Entry(**data)
