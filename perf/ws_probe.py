"""GPU probe for perf/ws_proto.py: correctness on edge cases, then time against the tuned dispatch and fa3.

Run on the GPU machine: source .peers/activate.sh; python perf/ws_probe.py [check] [time]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ws_proto as W  # noqa: E402

import tuner  # noqa: E402
from tuner.device import gpu_info  # noqa: E402
from tuner.loader import load_module  # noqa: E402
from tuner.reference import mla_decode_ref  # noqa: E402
from tuner.timing import time_call  # noqa: E402
from tuner.workloads import Workload, benchmark_set, make_inputs  # noqa: E402

DEV = torch.device("cuda")
ARGS = sys.argv[1:]


def ws_decode(inp, spec, num_programs, bn, st, pb, out_regs=200):
    b = inp.q_nope.shape[0]
    mod = load_module(spec)
    rows = mod.scratch_rows(b, num_programs)
    po = torch.empty(rows * 512, dtype=torch.float32, device=DEV)
    pl = torch.empty(rows, dtype=torch.float32, device=DEV)
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(b, spec.num_heads, dtype=torch.float32, device=DEV)

    def run():
        W.launch_stage1(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices,
                        inp.kv_last_page_len, inp.sm_scale, out, lse, po, pl, num_programs,
                        block_n=bn, num_stages=st, p_bufs=pb, out_regs=out_regs)
        mod._decode_stage2[(b * spec.num_heads // 4 * 4,)](
            inp.kv_indptr, out, lse, po, pl, b, num_programs, out.stride(0), out.stride(1), lse.stride(0),
            MERGE_BLOCK_H=4, MERGE_BLOCK_D=128, num_warps=4)
        return out, lse
    return run


def err(o, lse, ro, rl):
    rel = ((o.float() - ro).norm() / ro.norm().clamp_min(1e-30)).item()
    fin = torch.isfinite(rl)
    same_inf = bool((torch.isfinite(lse) == fin).all())
    lerr = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    ok = rel < 1e-2 and lerr < 2e-3 and same_inf and not o.isnan().any()
    return ok, rel, lerr


def check():
    cases = [
        ("h128 mixed", 128, (700, 64, 1, 0, 4096, 130, 63), 64),
        ("h64 mixed", 64, (1000, 3, 0, 0, 517), 64),
        ("h128 b1", 128, (1024,), 64),
        ("h128 ps32", 128, (300, 33, 2000), 32),
    ]
    bad = 0
    for name, heads, lens, ps in cases:
        w = Workload(name, heads, lens)
        inp = make_inputs(w, ps, torch.bfloat16, DEV, seed=1)
        ro, rl = mla_decode_ref(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr,
                                inp.kv_indices, inp.sm_scale, inp.kv_last_page_len)
        spec = w.spec(ps)
        for nprog in (1, 3, 7, 132):
            for bn, st, pb in ((64, 2, 1), (32, 3, 2), (32, 4, 2)):
                if bn > ps:
                    continue
                o, lse = ws_decode(inp, spec, nprog, bn, st, pb)()
                torch.cuda.synchronize()
                ok, rel, lerr = err(o, lse, ro, rl)
                bad += not ok
                print(f"  {name:12s} ps{ps} progs {nprog:3d} n{bn} st{st} pb{pb}: rel {rel:.2e} lse {lerr:.2e} "
                      f"{'OK' if ok else 'FAIL'}", flush=True)
    print("check:", "all OK" if not bad else f"{bad} FAILED", flush=True)


def fa3(inp, w, ps):
    try:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata
    except Exception:  # noqa: BLE001
        return None
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    wr = BatchMLAPagedAttentionWrapper(ws, backend="fa3")
    qo = torch.arange(w.batch + 1, dtype=torch.int32, device=DEV)
    kv_len = torch.tensor(w.kv_lens, dtype=torch.int32, device=DEV)
    wr.plan(metadata=MLAPlanMetadata.csr(qo, inp.kv_indptr, inp.kv_indices, kv_len), num_heads=w.heads,
            head_dim_ckv=512, head_dim_kpe=64, page_size=ps, causal=False, sm_scale=inp.sm_scale,
            q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, query_layout="split",
            kv_cache_layout="split", lse_mode="base2")
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(inp.q_nope.shape[:2], dtype=torch.float32, device=DEV)
    return lambda: wr.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, out=out, lse=lse, return_lse=True)


def timing():
    sms = gpu_info(DEV).num_sms
    rows = [w for w in benchmark_set() if w.is_decode and w.heads == 128]
    rows.append(Workload("d-h64-b64-4k", 64, (4096,) * 64))
    for w in rows:
        ps = 64
        inp = make_inputs(w, ps, torch.bfloat16, DEV, seed=0)
        spec = w.spec(ps)
        sub = slice(0, 8)
        ro, rl = mla_decode_ref(inp.q_nope[sub], inp.q_pe[sub], inp.ckv_cache, inp.kpe_cache,
                                inp.kv_indptr[:9], inp.kv_indices, inp.sm_scale, inp.kv_last_page_len[sub])
        args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices, inp.sm_scale,
                inp.kv_last_page_len)
        cur = time_call(lambda: tuner.mla_decode(*args), runs=40).median_us  # noqa: B023
        f = fa3(inp, w, ps)
        fa = time_call(f, runs=40).median_us if f else float("nan")
        print(f"{w.name:16s} ps{ps}: tuned triton {cur:8.1f} us   fa3 {fa:8.1f} us", flush=True)
        for nprog_per_sm in (1,):
            for bn, st, pb, regs in ((64, 2, 1, 200), (32, 3, 2, 200), (32, 4, 2, 200), (32, 2, 2, 200)):
                nprog = sms * nprog_per_sm
                run = ws_decode(inp, spec, nprog, bn, st, pb, regs)
                try:
                    o, lse = run()
                    torch.cuda.synchronize()
                    ok, rel, lerr = err(o[sub], lse[sub], ro, rl)
                    t = time_call(run, runs=40).median_us
                    print(f"    ws n{bn} st{st} pb{pb} progs {nprog}: {t:8.1f} us  ({cur / t:.2f}x tuned, "
                          f"{t / fa:.2f} of fa3)  rel {rel:.1e} {'OK' if ok else 'FAIL'}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"    ws n{bn} st{st} pb{pb}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        del inp
        torch.cuda.empty_cache()


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
if "check" in ARGS:
    check()
if "time" in ARGS:
    timing()
