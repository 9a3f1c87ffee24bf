"""GPU probe: what each decode stage costs inside the timed graph (tuned dispatch, L2 flushed).

Run on the GPU machine:  python perf/stage_probe.py [merge|align] ROW:PAGE_SIZE...
Prints the launch floor (one and two empty kernels timed the same way), then per row: the whole call,
stage 1 alone, stage 2 alone (on stage 1's scratch), num_programs, and how many requests span shares
(what stage 2 must merge). With ``align``: the whole call with the tuned num_programs and with
num_programs a multiple or a divisor of the batch near it (shares that start at request boundaries
when requests are equal). With ``merge``: the whole call with stage 2 as an ordinary launch and as a
programmatic dependent one, then every merge tile (merge_block_h x merge_block_d x merge_num_warps)
beside the tuned one. STALE_OK=1 uses the table's entries even where the generated module changed
since they were tuned (their configs are still valid): an A/B of a kernel change before the re-tune.
Development tool for perf/LOG.md.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
from dataclasses import replace

import torch
import triton

from tuner import MLADecode
from tuner.harness.inputs import benchmark_set, make_inputs
from tuner.harness.timing import time_call
from tuner.runtime.config import next_pow2
from tuner.runtime.loader import load_module


def spanning(kv_indptr: torch.Tensor, num_programs: int) -> int:
    ind = kv_indptr.cpu().tolist()
    total = ind[-1]

    def owner(page: int) -> int:  # as the generated module's _owner: the share holding page
        return ((page + 1) * num_programs - 1) // total if total else 0

    return sum(1 for a, b in zip(ind, ind[1:], strict=False) if b > a and owner(a) != owner(b - 1))


def setup(w, page_size: int):
    """The row's inputs, its planned call with the tuned dispatch, the plan's shape arguments, and outputs."""
    inp = make_inputs(w, page_size, torch.bfloat16, torch.device("cuda"), seed=0)
    shape = dict(num_heads=w.heads, page_size=page_size, sm_scale=inp.sm_scale, num_pages=inp.ckv_cache.shape[0])
    plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, **shape)
    out = torch.empty_like(inp.q_nope)
    lse = torch.empty(inp.q_nope.shape[:2], dtype=torch.float32, device=out.device)
    return inp, plan, shape, out, lse


def probe_row(w, page_size: int) -> str:
    inp, plan, _, out, lse = setup(w, page_size)
    mod, cfg, split = load_module(plan.spec), plan.config, plan.split
    last = inp.kv_last_page_len if page_size > 1 else None
    args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.kv_indptr, inp.kv_indices, last,
            plan.sm_scale, out, lse, split.partial_out, split.partial_lse, split.num_programs)

    def whole():
        plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, out=out, lse=lse)

    def stage1():
        if cfg.ws:
            mod._launch_ws_stage1(*args, cfg.block_n, cfg.num_stages)
        else:
            mod._launch_stage1(*args, cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.tma)

    def stage2():
        b = inp.q_nope.shape[0]
        grid = (b * -(-w.heads // cfg.merge_block_h) * (w.head_dim_ckv // cfg.merge_block_d),)
        pieces = ({"PIECES": mod.merge_pieces(cfg.merge_block_h, cfg.merge_block_d, cfg.merge_num_warps)}
                  if hasattr(mod, "merge_pieces") else {})  # (modules of before 2026-11-30's 8th session: none)
        mod._decode_stage2[grid](inp.kv_indptr, out, lse, split.partial_out, split.partial_lse, b,
                                 split.num_programs, out.stride(0), out.stride(1), lse.stride(0),
                                 MERGE_BLOCK_H=cfg.merge_block_h, MERGE_BLOCK_D=cfg.merge_block_d, PDL=False,
                                 num_warps=cfg.merge_num_warps, **pieces)

    t = [time_call(f, runs=40).median_us for f in (whole, stage1, stage2)]
    n = spanning(inp.kv_indptr, split.num_programs)
    return (f"{w.name:<18} {page_size:>3} {t[0]:8.1f} {t[1]:8.1f} {t[2]:8.1f} {split.num_programs:>6} {n:>5}  "
            f"{cfg.short()}")


def merge_row(w, page_size: int) -> str:
    """The whole call: PDL off and on with the tuned config, then each merge tile (the tuned pdl)."""
    inp, tuned, shape, out, lse = setup(w, page_size)

    def timed(config) -> float:
        plan = MLADecode().plan(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len, config=config,
                                validate_data=False, **shape)
        return time_call(lambda: plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, out=out, lse=lse),
                         runs=40).median_us

    off, on = (timed(replace(tuned.config, pdl=v)) for v in (0, 1))
    c = tuned.config
    line = f"{w.name:<18} {page_size:>3}  pdl off {off:7.1f} on {on:7.1f}  (mh{c.merge_block_h} md{c.merge_block_d} " \
           f"mw{c.merge_num_warps} pdl{c.pdl})"
    if os.environ.get("TILES") == "0":  # pdl off / on only
        return line
    results = []
    for mh, md, mw in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8)):
        if mh > max(4, next_pow2(w.heads)) or 2 * mh * md / (mw * 32) > 128:
            continue
        cfg = replace(tuned.config, merge_block_h=mh, merge_block_d=md, merge_num_warps=mw)
        results.append((timed(cfg), f"mh{mh} md{md} mw{mw}"))
    results.sort()
    return line + "  best: " + ", ".join(f"{n} {t:.1f}" for t, n in results[:4]) + \
        f"  worst: {results[-1][1]} {results[-1][0]:.1f}"


def align_row(w, page_size: int) -> str:
    """The whole call with the tuned config at its num_programs, then at each multiple or divisor of the
    batch between half and twice it, and at the SM count (num_programs: time µs / requests spanning)."""
    inp, plan, _, out, lse = setup(w, page_size)
    batch, n0 = inp.q_nope.shape[0], plan.split.num_programs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cands = {n for n in range(max(1, n0 // 2), 2 * n0 + 1) if n % batch == 0 or batch % n == 0} | {n0, sms}
    mod = load_module(plan.spec)
    res = []
    for n in sorted(cands):
        split = copy.copy(plan.split)
        rows = mod.scratch_rows(batch, n)
        split.num_programs = n
        split.partial_out = torch.empty(rows * w.head_dim_ckv, dtype=torch.float32, device=out.device)
        split.partial_lse = torch.empty(rows, dtype=torch.float32, device=out.device)
        plan.split = split
        t = time_call(lambda: plan.run(inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, out=out, lse=lse),
                      runs=40).median_us
        res.append(f"{'*' if n == n0 else ''}{n}: {t:.1f}/{spanning(inp.kv_indptr, n)}")
    return f"{w.name:<18} {page_size:>3}  " + "  ".join(res) + f"  ({plan.config.short()})"


@triton.jit
def _noop(x_ptr):
    pass


def launch_floor() -> str:
    """What the timing costs around nothing: one and two empty kernels, as the rows are timed."""
    x = torch.empty(1, device="cuda")
    one = time_call(lambda: _noop[(1,)](x), runs=40).median_us
    two = time_call(lambda: (_noop[(1,)](x), _noop[(1,)](x)), runs=40).median_us
    return f"launch floor: one empty kernel {one:.1f} us, two {two:.1f} us (graph replay, L2 flushed)"


class _AnyHash(str):
    """Equal to every kernel hash (a subclass's __ne__ is tried first: entry_hash != _AnyHash() is False)."""

    def __ne__(self, other: object) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


def use_stale_entries() -> None:
    """Let the dispatch use the table's entries of kernels whose generated module changed since they were
    tuned (their configs are still valid): for an A/B of a new switch before the re-tune."""
    from tuner.runtime import dispatch

    dispatch.module_hash = lambda spec: _AnyHash("any")


def main(argv: list[str]) -> None:
    if os.environ.get("STALE_OK") == "1":
        use_stale_entries()
    rows = {w.name: w for w in benchmark_set()}
    mode = argv[0] if argv[:1] in (["merge"], ["align"]) else ""
    if not mode:
        print(launch_floor(), flush=True)
        print(f"{'row':<18} {'ps':>3} {'whole':>8} {'stage1':>8} {'stage2':>8} {'progs':>6} {'span':>5}  config")
    for arg in argv[1:] if mode else argv:
        name, _, ps = arg.partition(":")
        probe = {"merge": merge_row, "align": align_row, "": probe_row}[mode]
        print(probe(rows[name], int(ps or 1)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
