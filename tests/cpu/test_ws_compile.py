"""The warp-specialized (Gluon) kernels (decode stage 1, prefill) cannot run under the interpreter, so CI
compiles them for sm_90a on the CPU (Triton ships ptxas): every capable catalogue module with its default config must
compile without register spills and within a Hopper's shared memory, and the module's shared-memory
formula must match the compiled kernel. The GPU suite checks its results.

The compiles run in a child process without TRITON_INTERPRET: under the interpreter, triton.language's
own jit helpers (gl.max, gl.sum) are interpreter objects that Gluon cannot compile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuner import MLASpec, catalogue
from tuner.runtime.config import default_decode_config, default_prefill_config, tile_of_pages, ws_capable, ws_narrow
from tuner.runtime.loader import load_module

SPECS = [s for s in catalogue() if ws_capable(s)]



def compile_ws(spec: MLASpec, block_n: int, num_stages: int, batch_of_one: bool = False, q_len: int = 1,
               paged: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    m = load_module(spec)
    if m.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    h, ckv, kpe, ps = spec.num_heads, spec.head_dim_ckv, spec.head_dim_kpe, spec.page_size
    q_nope, q_pe = torch.empty(2, h, ckv, dtype=torch.bfloat16), torch.empty(2, h, kpe, dtype=torch.bfloat16)
    cache_ckv, cache_kpe = (torch.empty(4, ps, d, dtype=torch.bfloat16) for d in (ckv, kpe))
    descs = {
        "q_nope_desc": m._ws_rows(q_nope, 2 * h, q_nope.stride(1), [m.WS_Q_ROWS, ckv]),
        "q_pe_desc": m._ws_rows(q_pe, 2 * h, q_pe.stride(1), [m.WS_Q_ROWS, kpe]),
        "ckv_desc": m._ws_rows(cache_ckv, 4 * ps, cache_ckv.stride(1), [ps if paged else block_n, ckv]),
        "kpe_desc": m._ws_rows(cache_kpe, 4 * ps, cache_kpe.stride(1), [ps if paged else block_n, kpe]),
    }
    fn = m._decode_stage1_ws if spec.is_decode else m._prefill_ws
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            signature[name] = mangle_type(descs[name])
        elif name.endswith("_ptr"):
            int_ptr = any(k in name for k in ("indptr", "indices", "last_page"))
            signature[name] = "*i32" if int_ptr else ("*bf16" if name in ("out_ptr", "ckv_ptr", "kpe_ptr") else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name.startswith("stride"):  # contiguous outputs: multiples of 16, as Triton specializes them
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.isupper() or (name == "batch" and batch_of_one):
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    p_bufs = m.ws_p_buffers(block_n, num_stages)
    constexprs = {"HAS_LAST_PAGE_LEN": True, "BLOCK_N": block_n, "NUM_STAGES": num_stages, "P_BUFS": p_bufs,
                  "GATHER": block_n > ps and not paged}
    if spec.is_decode:  # stage 1 lets stage 2 launch early (griddepcontrol.launch_dependents)
        constexprs["PDL"] = True
        constexprs["Q_LEN"] = q_len  # queries per request packed as rows (speculative decoding)
    if batch_of_one:  # what Triton does with an int argument equal to 1
        constexprs["batch"] = 1
    kernel = triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return m, kernel, p_bufs


def compile_report(name: str, tmp: str, q_len: int = 1, paged: bool = False) -> dict:
    """Compile spec ``name``'s default ws config; shared memory, the formula's figure and ptxas spills."""
    from triton.backends.nvidia.compiler import get_ptxas

    spec = MLASpec.from_name(name)
    config = default_decode_config(spec, 32, 4096, 132) if spec.is_decode else default_prefill_config(spec)
    block_n, stages = (64, 2) if paged else (config.block_n, config.num_stages)
    m, kernel, p_bufs = compile_ws(spec, block_n, stages, q_len=q_len, paged=paged)
    ptx = os.path.join(tmp, f"{name}_q{q_len}{'_paged' if paged else ''}.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"],
                          capture_output=True, text=True, check=True).stderr
    return {"ws": config.ws, "gather": block_n > spec.page_size and not paged, "shared": kernel.metadata.shared,
            "limit": m.WS_SHARED_BYTES,
            "formula": m.ws_shared_bytes(block_n, stages, p_bufs),
            "bulk_copies": kernel.asm["ptx"].count("cp.async.bulk.tensor"),
            "spills": [int(n) for n in re.findall(r"(\d+) bytes spill stores", info)],
            "setmaxnreg": "setmaxnreg" in kernel.asm["ptx"]}


def compile_batch_of_one(name: str) -> bool:
    spec = MLASpec.from_name(name)
    config = default_decode_config(spec, 1, 1024, 132) if spec.is_decode else default_prefill_config(spec)
    compile_ws(spec, config.block_n, config.num_stages, batch_of_one=True)
    return True


def run_compiles(function: str, *args: str) -> object:
    """``function(*args)`` of this module in a child process without TRITON_INTERPRET (its JSON result)."""
    code = f"import json, sys, test_ws_compile as t; print(json.dumps(t.{function}(*sys.argv[1:])))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_reports(tmp: str, *names: str) -> dict[str, dict]:
    return {n: compile_report(n, tmp) for n in names}


def compile_paged_reports(tmp: str, *names: str) -> dict[str, dict]:
    """The modules' ws kernels with 64-token tiles of whole pages copied page by page (tma=1 configs)."""
    return {n: compile_report(n, tmp, paged=True) for n in names}


def compile_packed_reports(tmp: str, *names: str) -> dict[str, dict]:
    """The decode modules' default ws configs compiled for 2 and 4 queries per request (rows packed)."""
    return {f"{n}:{q}": compile_report(n, tmp, q) for n in names for q in (2, 4)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    if load_module(SPECS[0]).gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    return run_compiles("compile_reports", str(tmp_path_factory.mktemp("ws")), *(s.name() for s in SPECS))


def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


def _spill_marks(spec: MLASpec) -> list[pytest.MarkDecorator]:
    """Known: triton 3.9's register allocation spills the 32-head swapped-product decode kernel's math
    warpgroup (20 bytes with the gathering loader, 96 with bulk copies; 3.6-3.8: 0-12). Not measured on a
    GPU yet (the lent GPU has triton 3.6); strict, so that a fix turns this back into a plain test."""
    if spec.is_decode and spec.num_heads == 32 and _triton_at_least(3, 9):
        return [pytest.mark.xfail(reason="triton 3.9 spills the 32-head narrow decode kernel", strict=True)]
    return []


@pytest.mark.parametrize("spec", [pytest.param(s, marks=_spill_marks(s)) for s in SPECS], ids=str)
def test_default_config_compiles_for_hopper_without_spills(spec: MLASpec, reports: dict[str, dict]) -> None:
    r = reports[spec.name()]
    assert r["ws"] == 1, "the default config of a capable spec uses the warp-specialized kernel"
    assert r["shared"] <= r["limit"]
    # Within 512 bytes; 768 for the swapped-product kernel (below 64 heads), whose per-column reductions'
    # scratch the formula counts as 16 bytes a head (Triton 3.6-3.7 at 32 heads; 3.8+ takes 256 bytes less).
    slack = 768 if spec.is_decode and ws_narrow(spec) else 512
    assert 0 <= r["formula"] - r["shared"] <= slack, f"ws_shared_bytes is an upper bound within {slack} bytes"
    # Decode: at most 16 bytes (32 heads with bulk copies: its [512, 32] accumulator leaves three values
    # stored once before the KV loop and reloaded in the epilogue, 12 bytes; the others none). Prefill:
    # its softmax warpgroup keeps a few 64-bit values on the stack (72-120 bytes, six 8-byte reloads per
    # KV tile from L1, measured in the SASS); more would be a regression.
    assert r["spills"] and max(r["spills"]) <= (16 if spec.is_decode else 128), r
    assert r["setmaxnreg"], "the partitions get their own register budgets"


PACKED = ["mla_paged_decode_h16_ckv512_kpe64_ps1", "mla_paged_decode_h32_ckv512_kpe64_ps64",
          "mla_paged_decode_h64_ckv512_kpe64_ps1", "mla_paged_decode_h128_ckv512_kpe64_ps64"]


def test_packed_decode_compiles_for_hopper_without_spills(tmp_path) -> None:
    """Speculative decoding's rows packed (Q_LEN 2 and 4: the per-row mask of the drafts) in both forms of the
    warp-specialized decode kernel, gathering and bulk-copying: within shared memory, spills as the default
    config's bound, each partition with its own register budget. (Its results: the GPU suite.)"""
    if load_module(SPECS[0]).gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    reports = run_compiles("compile_packed_reports", str(tmp_path), *PACKED)
    assert len(reports) == 2 * len(PACKED)
    for key, r in reports.items():
        assert r["ws"] == 1 and r["shared"] <= r["limit"], key
        # the 32-head swapped-product kernel with bulk copies keeps the drafts' row limits beside its [512, 32]
        # accumulator: 28-44 bytes on triton 3.6 (12 at one query), 112 on 3.9; the others none
        narrow32 = key.startswith("mla_paged_decode_h32")
        spill_bound = (128 if _triton_at_least(3, 9) else 64) if narrow32 else 16
        assert r["spills"] and max(r["spills"]) <= spill_bound, (key, r)
        assert r["setmaxnreg"], key


PAGED = ["mla_paged_decode_h16_ckv512_kpe64_ps16", "mla_paged_decode_h64_ckv512_kpe64_ps16",
         "mla_paged_decode_h128_ckv512_kpe64_ps32", "mla_paged_prefill_causal_h16_ckv512_kpe64_ps16",
         "mla_paged_prefill_causal_h128_ckv512_kpe64_ps32"]


def test_paged_bulk_loader_compiles_for_hopper(tmp_path) -> None:
    """64-token tiles over pages of 16 or 32 tokens copied page by page by bulk copies (ws, tma=1): one copy
    per page and cache in the loader (4 or 2 pages x ckv and kpe, beside the query rows'; Triton cuts each
    into 128-byte-wide boxes, 8 for a 512-wide row and 1 for a 64-wide one), no cp.async gather, the same
    shared memory as a gathered tile, spills within the default configs' bounds. (Its results: the GPU
    suite.)"""
    if load_module(SPECS[0]).gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    reports = run_compiles("compile_paged_reports", str(tmp_path), *PAGED)
    for name, r in reports.items():
        spec = MLASpec.from_name(name)
        pages = 64 // spec.page_size
        assert r["ws"] == 1 and not r["gather"] and r["shared"] <= r["limit"], name
        boxes = (spec.head_dim_ckv + spec.head_dim_kpe) * 2 // 128  # per row block of both caches (bf16)
        assert r["bulk_copies"] == boxes * (pages + 1), (name, r["bulk_copies"])
        narrow32 = spec.is_decode and spec.num_heads == 32
        bound = (16 if not narrow32 else 64) if spec.is_decode else 128
        assert r["spills"] and max(r["spills"]) <= bound, (name, r)


def test_paged_rule_matches_the_config_check() -> None:
    """The generated modules stand alone, so their ``ws_paged`` restates ``tuner.runtime.config.tile_of_pages``
    (which configs the paged loader runs vs which the config check accepts): the two must agree."""
    for spec in SPECS:
        m = load_module(spec)
        for block_n in (16, 32, 64, 128):
            assert m.ws_paged(block_n, 1) == tile_of_pages(spec, block_n), (spec.name(), block_n)
            assert not m.ws_paged(block_n, 0)


def test_ws_configs_fall_back_under_the_interpreter() -> None:
    """A ws=1 config is valid everywhere: where the Gluon kernel cannot run (the interpreter, CPU
    tensors) the Triton kernel runs with the same config and gives the reference's answer."""
    from helpers import TOLERANCES, assert_matches, make_case

    from tuner import DecodeConfig, PrefillConfig

    spec = MLASpec("decode", 64, 64, 16, 16)
    m = load_module(spec)
    case = make_case(64, [37, 0, 16, 5], page_size=16, ckv=64, kpe=16, dtype=torch.float16, seed=7)
    assert not m._ws_ready(case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache)
    out, lse = case.decode(config=DecodeConfig(block_h=64, block_n=16, num_stages=2, tma=1, ws=1, merge_block_h=4,
                                               merge_block_d=64))
    assert_matches(out, lse, *case.decode_ref(), TOLERANCES[torch.float16])
    case = make_case(16, [40, 9], [24, 9], page_size=16, ckv=64, kpe=16, dtype=torch.float16, seed=8)
    out, lse = case.prefill(True, config=PrefillConfig(block_m=4, block_h=16, block_n=16, num_stages=2, tma=1, ws=1))
    assert_matches(out, lse, *case.prefill_ref(True), TOLERANCES[torch.float16])


@pytest.mark.parametrize("variant, heads, capable", [
    ("decode", 4, False), ("decode", 8, True), ("decode", 48, False), ("decode", 192, True),
    ("prefill_causal", 4, True), ("prefill", 48, False), ("prefill", 128, True)])
def test_ws_capable_head_counts(variant: str, heads: int, capable: bool) -> None:
    """Decode below 64 heads puts the heads in wgmma's N (8 at least); otherwise heads must divide 64
    or come in groups of 64 (a 64-row tile)."""
    assert ws_capable(MLASpec(variant, heads, 512, 64, 1)) is capable


def test_batch_of_one_compiles() -> None:
    """A batch of one reaches the kernel as a constant (Triton specialises int arguments equal to 1): the
    request search must compile then too (a while loop over a constant count once crashed the lowering)."""
    if load_module(SPECS[0]).gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    assert run_compiles("compile_batch_of_one", "mla_paged_decode_h16_ckv512_kpe64_ps1") is True
    assert run_compiles("compile_batch_of_one", "mla_paged_decode_h128_ckv512_kpe64_ps64") is True


def test_a_gluon_kernel_that_does_not_compile_falls_back_once(recwarn: pytest.WarningsRecorder) -> None:
    """A Gluon API this template does not know (a compile error at the first launch) costs one warning,
    then the Triton kernels run every config of that module; nothing crashes."""
    from triton.compiler.errors import CompilationError

    m = load_module(MLASpec("prefill", 16, 512, 64, 64))
    m.WS_COMPILE_ERROR.clear()

    class GluonChanged(CompilationError):
        def __init__(self) -> None:
            Exception.__init__(self, "at 13:4:\nasync_copy_global_to_shared has been removed")

        def __str__(self) -> str:
            return str(self.args[0])

    def launch(*_: object) -> None:
        raise GluonChanged()

    calls: list[int] = []
    try:
        assert not m._ws_launched(launch, 1, 2)
        assert m._ws_launched(lambda *a: calls.append(len(a)), 1, 2) and calls == [2]  # the launch itself
        assert m.WS_COMPILE_ERROR == ["async_copy_global_to_shared has been removed"]
        warned = [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
        assert len(warned) == 1 and "the Triton kernels run instead" in str(warned[0].message)
        t = torch.zeros(1, 16, 512, dtype=torch.bfloat16)
        assert not m._ws_ready(t, t, t, t)
    finally:
        m.WS_COMPILE_ERROR.clear()


def test_a_gluon_without_the_hopper_api_degrades_with_one_warning() -> None:
    """A Triton whose Gluon lacks a name the modules import: every module loads with GLUON_ERROR set, the
    loader warns once per process, and the Triton kernels give the reference's answer."""
    import textwrap

    code = textwrap.dedent("""
        import sys, types, warnings
        import triton.experimental.gluon.language.nvidia.hopper as hopper
        fake = types.ModuleType(hopper.__name__)
        fake.__dict__.update({k: v for k, v in vars(hopper).items() if k != "warpgroup_mma"})  # a Gluon without it
        sys.modules[hopper.__name__] = fake
        import torch
        sys.path.insert(0, "tests")
        from helpers import assert_matches, make_case
        from tuner.runtime.loader import load_module
        from tuner.runtime.spec import MLASpec
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mods = [load_module(MLASpec("decode", 16, 512, 64, ps)) for ps in (1, 16)]
        assert all(m.gluon is None and "warpgroup_mma" in m.GLUON_ERROR for m in mods), [m.GLUON_ERROR for m in mods]
        gluon_warnings = [w for w in caught if "Gluon's Hopper API is unavailable" in str(w.message)]
        assert len(gluon_warnings) == 1, [str(w.message) for w in caught]
        case = make_case(16, [37, 5], page_size=16, dtype=torch.float16, seed=3)
        assert_matches(*case.decode(), *case.decode_ref())
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
