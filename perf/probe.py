"""GPU probe: bf16 correctness, default-config timings and a small config sweep beside FlashInfer fa3.

Run on the GPU machine:  source .peers/activate.sh; python perf/probe.py [decode|prefill|all] [sweep|tma|gather]
Development tool for the performance log (perf/LOG.md); the product's benchmark is `mla-tune bench`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import replace

import torch

import tuner
from tuner.harness.inputs import benchmark_set, make_inputs
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref
from tuner.harness.timing import time_call
from tuner.runtime.buckets import decode_bucket, prefill_bucket
from tuner.runtime.config import DecodeConfig, PrefillConfig, default_decode_config, default_prefill_config, ws_capable

DEV = torch.device("cuda")
WHAT = sys.argv[1] if len(sys.argv) > 1 else "all"
SWEEP = "sweep" in sys.argv[2:]
OUT = os.environ.get("OUT", "/tmp")
rows_out = []


def copy_bw() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), runs=20, graph=False)
    return 2 * x.numel() / (t.median_us * 1e-6)


def fi_wrapper(inp, w, ps, causal):
    try:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata
    except Exception as e:  # noqa: BLE001
        print("flashinfer unavailable:", e)
        return None
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    wr = BatchMLAPagedAttentionWrapper(ws, backend="fa3")
    qo = inp.qo_indptr if inp.qo_indptr is not None else torch.arange(w.batch + 1, dtype=torch.int32, device=DEV)
    kv_len = torch.tensor(w.kv_lens, dtype=torch.int32, device=DEV)
    wr.plan(metadata=MLAPlanMetadata.csr(qo, inp.kv_indptr, inp.kv_indices, kv_len), num_heads=w.heads,
            head_dim_ckv=512, head_dim_kpe=64, page_size=ps, causal=causal, sm_scale=inp.sm_scale,
            q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, query_layout="split",
            kv_cache_layout="split", lse_mode="base2")
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(inp.q_nope.shape[:2], dtype=torch.float32, device=DEV)
    return lambda: wr.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, out=out, lse=lse, return_lse=True)


def check(o, lse, ro, rl, tag):
    rel = ((o.float() - ro).norm() / ro.norm()).item()
    fin = torch.isfinite(rl)
    lerr = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    ok = rel < 1e-2 and lerr < 1e-3 and not o.isnan().any()
    print(f"  check {tag}: rel={rel:.2e} lse_err={lerr:.2e} {'OK' if ok else 'FAIL'}")
    return ok


def run_row(w, ps, configs, padded=False):
    inp = make_inputs(w, ps, torch.bfloat16, DEV, seed=0)
    if padded:  # one 576-wide cache, ckv/kpe as strided views: page stride is not a power of two
        kv = torch.cat([inp.ckv_cache, inp.kpe_cache], dim=-1)
        inp.ckv_cache, inp.kpe_cache = kv[..., :512], kv[..., 512:]
    causal = True
    floor_us = w.bytes_moved() / BW * 1e6
    if w.is_decode:
        args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices, inp.sm_scale,
                inp.kv_last_page_len)
        sub = slice(0, min(w.batch, 16))
        ro, rl = mla_decode_ref(inp.q_nope[sub], inp.q_pe[sub], inp.ckv_cache, inp.kpe_cache,
                                inp.kv_indptr[: sub.stop + 1], inp.kv_indices, inp.sm_scale, inp.kv_last_page_len[sub])
        fn = lambda cfg: tuner.mla_decode(*args, config=cfg)  # noqa: E731
    else:
        args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.qo_indptr, inp.kv_indptr, inp.kv_indices,
                inp.sm_scale, inp.kv_last_page_len)
        nq = int(inp.qo_indptr[min(w.batch, 4)])
        sub = slice(0, nq)
        ro, rl = mla_prefill_ref(inp.q_nope[sub], inp.q_pe[sub], inp.ckv_cache, inp.kpe_cache,
                                 inp.qo_indptr[: min(w.batch, 4) + 1], inp.kv_indptr[: min(w.batch, 4) + 1],
                                 inp.kv_indices, inp.sm_scale, inp.kv_last_page_len[: min(w.batch, 4)])
        fn = lambda cfg: tuner.mla_prefill(*args, config=cfg)  # noqa: E731
        floor_us = max(floor_us, w.flops() / 690e12 * 1e6)
    results = []
    for cfg in configs:
        try:
            o, lse = fn(cfg)
            torch.cuda.synchronize()
            ok = check(o[sub], lse[sub], ro, rl, f"{w.name} ps{ps} {cfg.short() if cfg else 'default'}")
            t = time_call(lambda: fn(cfg), runs=50)  # noqa: B023
            results.append((t.median_us, cfg, ok))
            print(f"  {w.name:16s} ps{ps:<3d} {t.median_us:9.1f} us  floor {floor_us:7.1f}  "
                  f"{'default' if cfg is None else cfg.short()}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {w.name} ps{ps} {cfg} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
    fi = fi_wrapper(inp, w, ps, causal)
    fi_us = None
    if fi is not None:
        o, lse = fi()
        check(o[sub], lse[sub], ro, rl, f"{w.name} ps{ps} fa3")
        fi_us = time_call(fi, runs=50).median_us
    best = min(results, key=lambda r: r[0]) if results else (float("nan"), None, False)
    default_us = next((r[0] for r in results if r[1] is None), float("nan"))
    rows_out.append(dict(row=w.name + ("-padded" if padded else ""), ps=ps, default_us=default_us, best_us=best[0],
                         best_cfg=None if best[1] is None else best[1].to_dict(), fa3_us=fi_us, floor_us=floor_us))
    del inp
    torch.cuda.empty_cache()


BW = float("nan")  # measured by main()


def main() -> None:
    global BW
    BW = copy_bw()
    print(f"copy bandwidth {BW / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import triton

    print("triton", triton.__version__)

    ONLY = [a[5:] for a in sys.argv[2:] if a.startswith("rows=")]
    for w in benchmark_set():
        if ONLY and w.name not in ONLY[0].split(","):
            continue
        if (w.is_decode and WHAT not in ("decode", "all")) or (not w.is_decode and WHAT not in ("prefill", "all")):
            continue
        for ps in (1, 64):
            configs = [None]
            if SWEEP and w.is_decode:
                base = tuner.runtime.dispatch.decode_config(w.spec(ps), w.batch, w.avg_kv_len, DEV).to_dict()
                grid = ([(16, 64, 8, 2, 1), (16, 64, 8, 3, 1), (16, 32, 4, 3, 1), (16, 32, 4, 3, 2), (16, 32, 4, 4, 1),
                         (16, 16, 4, 4, 2)] if w.heads <= 16 else
                        [(64, 32, 8, 3, 1), (64, 32, 8, 2, 1), (64, 64, 8, 1, 1), (64, 32, 8, 4, 1)])
                for bh, bn, nw, st, pps in grid:
                    configs.append(DecodeConfig(**{**base, "block_h": bh, "block_n": bn, "num_warps": nw,
                                                   "num_stages": st, "programs_per_sm": pps}))
            if "small" in sys.argv[2:] and w.is_decode:
                base = tuner.runtime.dispatch.decode_config(w.spec(ps), w.batch, w.avg_kv_len, DEV).to_dict()
                for st, mbh, mbd in itertools.product((32, 64, 128), (4, 16), (32, 128)):
                    configs.append(DecodeConfig(**{**base, "split_tokens": st, "merge_block_h": mbh,
                                                   "merge_block_d": mbd}))
            if SWEEP and not w.is_decode:
                for bm, bh, nw, bn, st in [(4, 16, 8, 32, 3), (4, 16, 8, 32, 4), (4, 16, 8, 64, 2), (2, 16, 4, 64, 3),
                                           (4, 16, 8, 16, 4), (2, 16, 4, 32, 4)]:
                    configs.append(PrefillConfig(block_m=bm, block_h=bh, block_n=bn, num_warps=nw, num_stages=st))
            if "tma" in sys.argv[2:]:  # bulk tensor copies against the gather, from the committed tuned configs
                if ps == 1:
                    continue
                if w.is_decode:
                    cls, bucket = DecodeConfig, decode_bucket(w.batch, w.avg_kv_len)
                    default = default_decode_config(w.spec(ps), w.batch, w.avg_kv_len, 132)
                    extras = ({}, {"tma": 1}, {"block_n": 32, "tma": 1, "num_stages": 4},
                              {"block_n": 32, "tma": 1, "num_stages": 3, "num_warps": 4, "programs_per_sm": 2})
                else:
                    cls, bucket = PrefillConfig, prefill_bucket(w.total_q, w.avg_kv_len)
                    default = PrefillConfig()
                    extras = ({}, {"tma": 1}, {"tma": 1, "block_n": 32, "num_stages": 3})
                table = json.load(open("generated/dispatch/nvidia-h200.json"))["kernels"][w.spec(ps).name()]
                configs = []
                for c in (cls.from_dict(table[bucket.name]["config"]), default):
                    for extra in extras:
                        data = {**c.to_dict(), **extra}
                        if data["tma"]:  # a tile that bulk copies must fit in a page
                            data["block_n"] = min(data["block_n"], ps)
                        cfg = cls(**data)
                        if cfg not in configs:
                            configs.append(cfg)
            if "gather" in sys.argv[2:]:  # the ws kernels (gathering at page size 1) against the Triton kernels
                spec = w.spec(ps)
                if not ws_capable(spec) or (ps != 1 and not w.is_decode):
                    continue
                if w.is_decode:
                    triton_cfg = default_decode_config(spec, w.batch, w.avg_kv_len, 132, hopper=False)
                    ws = default_decode_config(spec, w.batch, w.avg_kv_len, 132)
                else:
                    triton_cfg, ws = default_prefill_config(spec, hopper=False), default_prefill_config(spec)
                configs = [triton_cfg] + [replace(ws, block_n=n, num_stages=st, tma=int(n <= ps))
                                          for n, st in ((64, 2), (32, 4))]
            run_row(w, ps, configs)
            if "padded" in sys.argv[2:] and w.is_decode and w.heads == 16:
                run_row(w, ps, [None], padded=True)

    print("\n| row | ps | default us | best us | fa3 us | floor us | default/fa3 | floor frac |")
    for r in rows_out:
        fa3 = r["fa3_us"] or float("nan")
        print(f"| {r['row']} | {r['ps']} | {r['default_us']:.1f} | {r['best_us']:.1f} | {fa3:.1f} | "
              f"{r['floor_us']:.1f} | {r['default_us'] / fa3:.2f} | {r['floor_us'] / r['default_us']:.2f} |")
    with open(os.path.join(OUT, f"probe_{WHAT}.json"), "w") as f:
        json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
