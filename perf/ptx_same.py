"""Whether two builds of the generated modules compile to the same kernels for the tuned table's entries:
the committed modules in OLD (a folder of generated/ files, e.g. from `git archive HEAD generated`) against
these. The warp-specialized (Gluon) kernel of each ws entry is compiled for sm_90a on the CPU, old and new,
at the entry's config, and the PTX compared with debug line info dropped (templates move lines); for the
Triton kernels, the decode stage 1 is compiled likewise at its entries' configs, and for the rest (stage 2,
prefill) the sources of every Triton function and the module's constants must be equal (what Triton
compiles from).

Used when a template change is meant to leave the compiled kernels of every tuned entry as they were (a
constexpr-guarded branch): then the table's entries may be re-stamped with the new module hashes instead of
re-tuned. Run: python perf/ptx_same.py OLD [--rekey TABLE]  (needs no GPU; prints one line per kernel)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuner import MLASpec  # noqa: E402
from tuner.runtime import paths  # noqa: E402
from tuner.runtime.fileio import source_hash  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def load(path: Path, tag: str):
    spec = importlib.util.spec_from_file_location(f"_ptx_{tag}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def signature_of(fn, descs: dict, constexprs: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            signature[name] = mangle_type(descs[name])
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            int_ptr = any(k in name for k in ("indptr", "indices", "last_page"))
            signature[name] = "*i32" if int_ptr else ("*bf16" if name in ("out_ptr", "ckv_ptr", "kpe_ptr", "q_nope_ptr",
                                                                          "q_pe_ptr") else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name.startswith("stride"):
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return signature, attrs


def clean(ptx: str) -> str:
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith((".loc", ".file", "//")) or not s:
            continue
        out.append(re.sub(r"_ptx_(old|new)_\w+", "M", line))
    text = "\n".join(out)
    return text.split(".section\t.debug", 1)[0]


def triton_sources(m) -> dict[str, object]:
    """Every Triton (not Gluon) function's source and every module-level constant: what Triton compiles from."""
    from triton.runtime.jit import JITFunction

    found: dict[str, object] = {}
    for name, obj in vars(m).items():
        if isinstance(obj, JITFunction) and "gluon" not in type(obj).__module__:
            found[name] = obj.src
        elif isinstance(obj, (int, float, str)) and name.isupper():
            found[name] = obj
    return found


def compile_kernels(m, spec: MLASpec, config: dict) -> dict[str, str]:
    from triton.compiler import ASTSource

    h, ckv, kpe, ps = spec.num_heads, spec.head_dim_ckv, spec.head_dim_kpe, spec.page_size
    found = {}
    bn = config["block_n"]
    fn = getattr(m, "_decode_stage1_ws" if spec.is_decode else "_prefill_ws", None)
    if config.get("ws") and fn is not None and m.gluon is not None:
        from triton.experimental.gluon._runtime import GluonASTSource

        q_nope, q_pe = torch.empty(2, h, ckv, dtype=torch.bfloat16), torch.empty(2, h, kpe, dtype=torch.bfloat16)
        cache_ckv, cache_kpe = (torch.empty(4, ps, d, dtype=torch.bfloat16) for d in (ckv, kpe))
        descs = {"q_nope_desc": m._ws_rows(q_nope, 2 * h, q_nope.stride(1), [m.WS_Q_ROWS, ckv]),
                 "q_pe_desc": m._ws_rows(q_pe, 2 * h, q_pe.stride(1), [m.WS_Q_ROWS, kpe]),
                 "ckv_desc": m._ws_rows(cache_ckv, 4 * ps, cache_ckv.stride(1), [bn, ckv]),
                 "kpe_desc": m._ws_rows(cache_kpe, 4 * ps, cache_kpe.stride(1), [bn, kpe])}
        constexprs = {"HAS_LAST_PAGE_LEN": ps > 1, "BLOCK_N": bn, "NUM_STAGES": config["num_stages"],
                      "P_BUFS": m.ws_p_buffers(bn, config["num_stages"]), "GATHER": bn > ps}
        if spec.is_decode:
            constexprs["PDL"] = bool(config.get("pdl"))
        if "Q_LEN" in fn.arg_names:
            constexprs["Q_LEN"] = 1
        sig, attrs = signature_of(fn, descs, constexprs)
        k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=TARGET, options={"num_warps": 4})
        found["ws"] = k.asm["ptx"]
    elif spec.is_decode:
        from triton.tools.tensor_descriptor import TensorDescriptor

        tma = bool(config.get("tma")) and bn <= ps
        descs = {}
        if tma:
            cache_ckv, cache_kpe = (torch.empty(4, ps, d, dtype=torch.bfloat16) for d in (ckv, kpe))
            descs = {"ckv_desc": TensorDescriptor.from_tensor(cache_ckv, [1, bn, ckv]),
                     "kpe_desc": TensorDescriptor.from_tensor(cache_kpe, [1, bn, kpe])}
        constexprs = {"HAS_LAST_PAGE_LEN": ps > 1, "BLOCK_H": config["block_h"], "BLOCK_N": bn, "USE_TMA": tma,
                      "PDL": bool(config.get("pdl")) and not config.get("ws")}
        if "Q_LEN" in m._decode_stage1.arg_names:
            constexprs["Q_LEN"] = 1
        if not tma:
            constexprs.update({"ckv_desc": None, "kpe_desc": None})
        sig, attrs = signature_of(m._decode_stage1, descs, constexprs)
        k = triton.compile(ASTSource(fn=m._decode_stage1, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=TARGET, options={"num_warps": config["num_warps"],
                                                   "num_stages": config["num_stages"]})
        found["triton"] = k.asm["ptx"]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("--rekey", type=Path, help="a dispatch table: re-stamp the entries of modules found the same")
    args = ap.parse_args()
    table_path = args.rekey or next(paths.generated_dir().joinpath("dispatch").glob("*.json"))
    table = json.loads(table_path.read_text())
    same_modules, differ = [], []
    for name, entries in sorted(table["kernels"].items()):
        spec = MLASpec.from_name(name)
        old_path, new_path = args.old / f"{name}.py", paths.generated_dir() / f"{name}.py"
        old_hash = source_hash(old_path.read_text())
        old, new = load(old_path, "old"), load(new_path, "new")
        configs = {json.dumps(e["config"], sort_keys=True) for e in entries.values() if e["kernel_hash"] == old_hash}
        ok = triton_sources(old) == triton_sources(new)
        print(f"{name} Triton sources and constants: {'same' if ok else 'DIFFERENT'}", flush=True)
        for text in sorted(configs):
            config = json.loads(text)
            a, b = compile_kernels(old, spec, config), compile_kernels(new, spec, config)
            for kind in a:
                same = clean(a[kind]) == clean(b[kind])
                ok &= same
                print(f"{name} {kind} {text}: {'same' if same else 'DIFFERENT'}", flush=True)
        (same_modules if ok else differ).append((name, old_hash, source_hash(new_path.read_text())))
    print(f"{len(same_modules)} modules the same, {len(differ)} different: {[d[0] for d in differ]}")
    if args.rekey:
        for name, old_hash, new_hash in same_modules:
            for entry in table["kernels"][name].values():
                if entry["kernel_hash"] == old_hash:
                    entry["kernel_hash"] = new_hash
        args.rekey.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"re-stamped {len(same_modules)} modules' entries in {args.rekey}")


if __name__ == "__main__":
    main()
