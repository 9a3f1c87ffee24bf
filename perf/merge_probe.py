"""Probe: the decode merge (stage 2) with the pieces of a request loaded together, against the current one.

Hypothesis (perf/LOG.md, "H200 profile"): stage 2 folds a request's pieces one after another, each a
dependent DRAM round trip, so at small batch it costs ~8 µs of d-b1-1k's ~21. Loading up to PIECES
pieces at once ([PIECES, heads, dims] in one tl.load) makes it one round trip for the lse and one for
the partial outputs. This script leaves the product alone: it runs stage 1 through the tuned plan,
then times the module's own stage 2 and the chunked variant on the same scratch, and checks they agree.

    python perf/merge_probe.py d-b1-1k:1 d-b256-4k:64 ...      (GPU; on the CPU: a correctness check only)
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tuner import MLADecode  # noqa: E402
from tuner.harness.inputs import Workload, benchmark_set, make_inputs  # noqa: E402
from tuner.harness.timing import time_call  # noqa: E402
from tuner.runtime.config import default_decode_config  # noqa: E402
from tuner.runtime.loader import load_module  # noqa: E402
from tuner.runtime.spec import MLASpec  # noqa: E402

# The share arithmetic of the generated decode modules (the same in every one), reused as is.
_helpers = load_module(MLASpec("decode", 16, 512, 64, 1))
_share_start, _owner = _helpers._share_start, _helpers._owner


@triton.jit
def _merge_chunked(kv_indptr_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, batch, num_programs,
                   stride_o_b, stride_o_h, stride_lse_b,
                   H: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PIECES: tl.constexpr):
    N_H: tl.constexpr = (H + BH - 1) // BH
    N_D: tl.constexpr = D // BD
    pid = tl.program_id(0)
    seq = (pid // (N_H * N_D)).to(tl.int64)
    pid_h = (pid // N_D) % N_H
    pid_d = pid % N_D
    first_page = tl.load(kv_indptr_ptr + seq)
    seq_end = tl.load(kv_indptr_ptr + seq + 1)
    total_pages = tl.load(kv_indptr_ptr + batch)
    p_first = _owner(first_page, total_pages, num_programs)
    p_last = _owner(seq_end - 1, total_pages, num_programs)
    if (seq_end > first_page) & (p_first == p_last):
        return
    offs_h = pid_h * BH + tl.arange(0, BH)
    mask_h = offs_h < H
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_p = tl.arange(0, PIECES)
    m = tl.full([BH], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, BD], dtype=tl.float32)
    if seq_end > first_page:
        for p0 in range(p_first, p_last + 1, PIECES):
            p = p0 + offs_p
            valid = (p <= p_last) & (_share_start(p + 1, total_pages, num_programs) >
                                     _share_start(p, total_pages, num_programs))
            row = (p.to(tl.int64) + seq)[:, None] * H + offs_h[None, :]
            lse_p = tl.load(part_lse_ptr + row, mask=valid[:, None] & mask_h[None, :], other=float("-inf"))
            m = tl.maximum(m, tl.max(lse_p, axis=0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for p0 in range(p_first, p_last + 1, PIECES):
            p = p0 + offs_p
            valid = (p <= p_last) & (_share_start(p + 1, total_pages, num_programs) >
                                     _share_start(p, total_pages, num_programs))
            row = (p.to(tl.int64) + seq)[:, None] * H + offs_h[None, :]
            ok = valid[:, None] & mask_h[None, :]
            lse_p = tl.load(part_lse_ptr + row, mask=ok, other=float("-inf"))
            part = tl.load(part_out_ptr + row[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
            w = tl.math.exp2(lse_p - m_safe[None, :])
            acc += tl.sum(w[:, :, None] * part, axis=0)
            denom += tl.sum(w, axis=0)
    empty = denom == 0.0
    o = acc / tl.where(empty, 1.0, denom)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.math.log2(tl.where(empty, 1.0, denom)))
    tl.store(out_ptr + seq * stride_o_b + offs_h[:, None] * stride_o_h + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_h[:, None])
    if pid_d == 0:
        tl.store(lse_ptr + seq * stride_lse_b + offs_h, lse, mask=mask_h)


def probe(w: Workload, page_size: int, device: torch.device, dtype: torch.dtype, pieces: int) -> str:
    inp = make_inputs(w, page_size, dtype, device, seed=0)
    config = None
    if device.type == "cpu":  # more shares than PIECES, so that the chunk loop runs more than once
        spec = w.spec(page_size)
        config = replace(default_decode_config(spec, w.batch, 100, 4), programs_per_sm=4, split_tokens=16)
    plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, num_heads=w.heads,
                            page_size=page_size, sm_scale=inp.sm_scale, head_dim_ckv=w.head_dim_ckv,
                            head_dim_kpe=w.head_dim_kpe, num_pages=inp.ckv_cache.shape[0], config=config)
    cfg, split, spec = plan.config, plan.split, plan.spec
    out, lse = plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache)  # stage 1 fills the scratch
    mod = load_module(spec)
    batch, heads, dim = out.shape
    grid = (batch * triton.cdiv(heads, cfg.merge_block_h) * (dim // cfg.merge_block_d),)
    args = (inp.kv_indptr, out, lse, split.partial_out, split.partial_lse, batch, split.num_programs,
            out.stride(0), out.stride(1), lse.stride(0))
    out2, lse2 = torch.empty_like(out), torch.empty_like(lse)
    args2 = (inp.kv_indptr, out2, lse2, *args[3:])

    def old() -> None:
        mod._decode_stage2[grid](*args, MERGE_BLOCK_H=cfg.merge_block_h, MERGE_BLOCK_D=cfg.merge_block_d,
                                 PIECES=mod.merge_pieces(cfg.merge_block_h, cfg.merge_block_d, cfg.merge_num_warps),
                                 PDL=False, num_warps=cfg.merge_num_warps)

    def new() -> None:
        _merge_chunked[grid](*args2, H=heads, D=dim, BH=cfg.merge_block_h, BD=cfg.merge_block_d, PIECES=pieces,
                             num_warps=cfg.merge_num_warps)

    old()
    out2.copy_(out)  # rows stage 1 wrote directly are not touched by either merge; poison the others
    lse2.copy_(lse)
    indptr = inp.kv_indptr.tolist()
    total, n = indptr[-1], split.num_programs
    owner = [((x + 1) * n - 1) // max(total, 1) for x in range(total)]
    merged = [b for b in range(batch) if indptr[b + 1] == indptr[b] or owner[indptr[b]] != owner[indptr[b + 1] - 1]]
    out2[merged] = float("nan")
    lse2[merged] = float("nan")
    new()
    err = (out2.float() - out.float()).abs().max().item()
    same_inf = torch.isinf(lse2) & torch.isinf(lse) & (lse2 == lse)
    lerr = torch.where(same_inf, 0.0, (lse2 - lse).abs()).max().item()  # a NaN left behind fails below
    assert err < 1e-2 and lerr < 1e-4, (err, lerr)  # NaN compares False: an unwritten row fails
    line = (f"{w.name}:{page_size} {spec.name()} merged {len(merged)}/{batch} programs {split.num_programs} "
            f"merge {cfg.merge_block_h}x{cfg.merge_block_d} w{cfg.merge_num_warps}: "
            f"|d out| {err:.1e} |d lse| {lerr:.1e}"
            )
    if device.type == "cuda":
        t_old = time_call(old, device=device, runs=100).median_us
        t_new = time_call(new, device=device, runs=100).median_us
        t_all = time_call(lambda: plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache),
                          device=device, runs=100).median_us
        line += f" | stage 2 now {t_old:.1f} us, chunked({pieces}) {t_new:.1f} us; whole call {t_all:.1f} us"
    return line


def main(argv: list[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    rows = {w.name: w for w in benchmark_set()}
    if device.type == "cpu":  # the interpreter: small shapes of the same structure
        rows = {"tiny-b1": Workload("tiny-b1", 16, (300,)), "tiny-skew": Workload("tiny-skew", 16, (5, 400, 0, 77))}
        argv = argv or ["tiny-b1:1", "tiny-skew:16"]
    for arg in argv:
        name, _, ps = arg.partition(":")
        for pieces in (8, 16):
            print(probe(rows[name], int(ps or 1), device, dtype, pieces), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
