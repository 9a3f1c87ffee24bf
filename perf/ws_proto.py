"""Prototype: warp-specialized MLA decode stage 1 in Gluon for 64-row head groups (Hopper).

Partitions: a loader warp (TMA: q once per piece, KV tiles), a softmax warpgroup (QK, online softmax,
P and its row rescale to shared memory, PV into output columns [0, 256)) and an output warpgroup (PV
into columns [256, 512) from the shared P). QK runs once per tile (not in both warpgroups).
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

BLOCK_H = 64


@gluon.jit
def _share_bounds(kv_indptr_ptr, batch, num_programs, p):
    total = gl.load(kv_indptr_ptr + batch)
    start = (total.to(gl.int64) * p) // num_programs
    end = (total.to(gl.int64) * (p + 1)) // num_programs
    return start, end


@gluon.jit
def _find_request(kv_indptr_ptr, batch, page):
    lo = 0
    hi = batch - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if gl.load(kv_indptr_ptr + mid) <= page:
            lo = mid
        else:
            hi = mid - 1
    return lo


@gluon.jit
def _piece(kv_indptr_ptr, kv_last_page_len_ptr, seq, page, share_end,
           PAGE_SIZE: gl.constexpr, HAS_LAST_PAGE_LEN: gl.constexpr):
    """(first_page, seq_end, chunk_end, start, end) of request seq's piece in this share."""
    first_page = gl.load(kv_indptr_ptr + seq)
    seq_end = gl.load(kv_indptr_ptr + seq + 1)
    n_pages = seq_end - first_page
    if HAS_LAST_PAGE_LEN:
        last = gl.load(kv_last_page_len_ptr + seq)
        last = gl.minimum(gl.maximum(last, 0), PAGE_SIZE)
    else:
        last = PAGE_SIZE
    kv_len = gl.where(n_pages > 0, (n_pages - 1) * PAGE_SIZE + last, 0)
    chunk_end = gl.minimum(share_end, seq_end)
    start = ((page - first_page) * PAGE_SIZE).to(gl.int32)
    end = gl.minimum((chunk_end - first_page) * PAGE_SIZE, kv_len).to(gl.int32)
    end = gl.maximum(end, start)
    return first_page, seq_end, chunk_end, start, end


@gluon.jit
def _loader(q_nope_desc, q_pe_desc, ckv_desc, kpe_desc, kv_indptr_ptr, kv_indices_ptr,
            kv_last_page_len_ptr, batch, num_programs, q_nope_s, q_pe_s, kc_s, kp_s,
            q_ready, q_empty, kv_ready, kv_empty,
            NUM_HEADS: gl.constexpr, PAGE_SIZE: gl.constexpr, HAS_LAST_PAGE_LEN: gl.constexpr,
            BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    N_GROUPS: gl.constexpr = NUM_HEADS // 64
    pid = gl.program_id(0)
    p = pid // N_GROUPS
    g = pid % N_GROUPS
    page, share_end = _share_bounds(kv_indptr_ptr, batch, num_programs, p)
    if page < share_end:
        seq = _find_request(kv_indptr_ptr, batch, page)
        it = 0
        pc = 0
        while page < share_end:
            first_page, seq_end, chunk_end, start, end = _piece(
                kv_indptr_ptr, kv_last_page_len_ptr, seq, page, share_end, PAGE_SIZE, HAS_LAST_PAGE_LEN)
            mbarrier.wait(q_empty, (pc & 1) ^ 1)
            mbarrier.expect(q_ready, q_nope_desc.block_type.nbytes + q_pe_desc.block_type.nbytes)
            row_q = (seq * NUM_HEADS + g * 64).to(gl.int32)
            tma.async_copy_global_to_shared(q_nope_desc, [row_q, 0], q_ready, q_nope_s)
            tma.async_copy_global_to_shared(q_pe_desc, [row_q, 0], q_ready, q_pe_s)
            for n0 in range(start, end, BLOCK_N):
                s = it % NUM_STAGES
                ph = (it // NUM_STAGES) & 1
                mbarrier.wait(kv_empty.index(s), ph ^ 1)
                page_id = gl.load(kv_indices_ptr + first_page + n0 // PAGE_SIZE)
                row = page_id * PAGE_SIZE + n0 % PAGE_SIZE
                mbarrier.expect(kv_ready.index(s), ckv_desc.block_type.nbytes + kpe_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(ckv_desc, [row, 0], kv_ready.index(s), kc_s.index(s))
                tma.async_copy_global_to_shared(kpe_desc, [row, 0], kv_ready.index(s), kp_s.index(s))
                it += 1
            pc += 1
            page = chunk_end
            seq += 1


@gluon.jit
def _softmax_wg(kv_indptr_ptr, kv_last_page_len_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                qk_scale, batch, num_programs, stride_o_b, stride_o_h, stride_lse_b,
                q_nope_s, q_pe_s, kc_s, kp_s, p_s, alpha_s, fin_s,
                q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty, fin_ready, fin_empty,
                NUM_HEADS: gl.constexpr, HEAD_DIM_CKV: gl.constexpr, PAGE_SIZE: gl.constexpr,
                HAS_LAST_PAGE_LEN: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                P_BUFS: gl.constexpr):
    N_GROUPS: gl.constexpr = NUM_HEADS // 64
    HALF: gl.constexpr = HEAD_DIM_CKV // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

    pid = gl.program_id(0)
    p = pid // N_GROUPS
    g = pid % N_GROUPS
    page, share_end = _share_bounds(kv_indptr_ptr, batch, num_programs, p)
    offs_h = g * 64 + gl.arange(0, 64, layout=row_o)
    offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
    offs_hs = g * 64 + gl.arange(0, 64, layout=row_s)
    if page < share_end:
        seq = _find_request(kv_indptr_ptr, batch, page)
        it = 0
        pc = 0
        while page < share_end:
            first_page, seq_end, chunk_end, start, end = _piece(
                kv_indptr_ptr, kv_last_page_len_ptr, seq, page, share_end, PAGE_SIZE, HAS_LAST_PAGE_LEN)
            m_i = gl.full([64], float("-inf"), gl.float32, layout=row_s)
            l_i = gl.zeros([64], gl.float32, layout=row_s)
            acc = gl.zeros([64, HALF], gl.float32, layout=o_layout)
            mbarrier.wait(q_ready, pc & 1)
            for n0 in range(start, end, BLOCK_N):
                s = it % NUM_STAGES
                ph = (it // NUM_STAGES) & 1
                mbarrier.wait(kv_ready.index(s), ph)
                kc = kc_s.index(s)
                qk = warpgroup_mma(q_pe_s, kp_s.index(s).permute((1, 0)),
                                   gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout),
                                   use_acc=False, is_async=True)
                qk = warpgroup_mma(q_nope_s, kc.permute((1, 0)), qk, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
                cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                sc = gl.where((cols < end)[None, :], qk * qk_scale, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(sc, 1))
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_safe)
                pr = gl.exp2(sc - m_safe[:, None])
                l_i = l_i * alpha + gl.sum(pr, 1)
                m_i = m_new
                if n0 + BLOCK_N > end:  # a partial tile: zero the unused rows (NaN may sit there)
                    valid = end - n0
                    for r0 in gl.static_range(0, BLOCK_N, 8):
                        if r0 + 8 > valid:
                            chunk = kc.slice(r0, 8, dim=0)
                            v = chunk.load(zl)
                            rows = r0 + gl.arange(0, 8, layout=gl.SliceLayout(1, zl))
                            chunk.store(gl.where((rows < valid)[:, None], v, 0.0))
                pb = it % P_BUFS
                pph = (it // P_BUFS) & 1
                p_bf = pr.to(gl.bfloat16)
                mbarrier.wait(p_empty.index(pb), pph ^ 1)
                p_s.index(pb).store(p_bf)
                alpha_s.index(pb).store(alpha)
                fence_async_shared()
                mbarrier.arrive(p_ready.index(pb), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                acc = warpgroup_mma(gl.convert_layout(p_bf, p_op), kc.slice(0, HALF, dim=1), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(s), count=1)
                it += 1
            mbarrier.arrive(q_empty, count=1)
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            lse = gl.where(empty, float("-inf"), m_i + gl.log2(l_safe))
            mbarrier.wait(fin_empty, (pc & 1) ^ 1)
            fin_s.store(l_safe)
            mbarrier.arrive(fin_ready, count=1)
            o = acc / gl.convert_layout(l_safe, row_o)[:, None]
            seq64 = seq.to(gl.int64)
            if (page == first_page) & (chunk_end == seq_end):
                gl.store(out_ptr + seq64 * stride_o_b + offs_h[:, None] * stride_o_h + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty))
                gl.store(lse_ptr + seq64 * stride_lse_b + offs_hs, lse)
            else:
                row = (p + seq64) * NUM_HEADS + offs_h
                gl.store(part_out_ptr + row[:, None] * HEAD_DIM_CKV + offs_d[None, :], o)
                gl.store(part_lse_ptr + (p + seq64) * NUM_HEADS + offs_hs, lse)
            pc += 1
            page = chunk_end
            seq += 1


@gluon.jit
def _output_wg(kv_indptr_ptr, kv_last_page_len_ptr, out_ptr, part_out_ptr, batch, num_programs,
               stride_o_b, stride_o_h, kc_s, p_s, alpha_s, fin_s,
               kv_ready, kv_empty, p_ready, p_empty, fin_ready, fin_empty,
               NUM_HEADS: gl.constexpr, HEAD_DIM_CKV: gl.constexpr, PAGE_SIZE: gl.constexpr,
               HAS_LAST_PAGE_LEN: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                P_BUFS: gl.constexpr):
    N_GROUPS: gl.constexpr = NUM_HEADS // 64
    HALF: gl.constexpr = HEAD_DIM_CKV // 2
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    pid = gl.program_id(0)
    p = pid // N_GROUPS
    g = pid % N_GROUPS
    page, share_end = _share_bounds(kv_indptr_ptr, batch, num_programs, p)
    offs_h = g * 64 + gl.arange(0, 64, layout=row_o)
    offs_d = HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
    if page < share_end:
        seq = _find_request(kv_indptr_ptr, batch, page)
        it = 0
        pc = 0
        while page < share_end:
            first_page, seq_end, chunk_end, start, end = _piece(
                kv_indptr_ptr, kv_last_page_len_ptr, seq, page, share_end, PAGE_SIZE, HAS_LAST_PAGE_LEN)
            acc = gl.zeros([64, HALF], gl.float32, layout=o_layout)
            for n0 in range(start, end, BLOCK_N):
                s = it % NUM_STAGES
                ph = (it // NUM_STAGES) & 1
                pb = it % P_BUFS
                pph = (it // P_BUFS) & 1
                mbarrier.wait(p_ready.index(pb), pph)
                mbarrier.wait(kv_ready.index(s), ph)
                alpha = alpha_s.index(pb).load(row_o)
                acc = acc * alpha[:, None]
                acc = warpgroup_mma(p_s.index(pb), kc_s.index(s).slice(HALF, HALF, dim=1), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(p_empty.index(pb), count=1)
                mbarrier.arrive(kv_empty.index(s), count=1)
                it += 1
            mbarrier.wait(fin_ready, pc & 1)
            l_safe = fin_s.load(row_o)
            mbarrier.arrive(fin_empty, count=1)
            o = acc / l_safe[:, None]
            seq64 = seq.to(gl.int64)
            if (page == first_page) & (chunk_end == seq_end):
                gl.store(out_ptr + seq64 * stride_o_b + offs_h[:, None] * stride_o_h + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty))
            else:
                row = (p + seq64) * NUM_HEADS + offs_h
                gl.store(part_out_ptr + row[:, None] * HEAD_DIM_CKV + offs_d[None, :], o)
            pc += 1
            page = chunk_end
            seq += 1


@gluon.jit
def _decode_stage1_ws(
    q_nope_desc, q_pe_desc, ckv_desc, kpe_desc,
    kv_indptr_ptr, kv_indices_ptr, kv_last_page_len_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, batch, num_programs, stride_o_b, stride_o_h, stride_lse_b,
    NUM_HEADS: gl.constexpr, HEAD_DIM_CKV: gl.constexpr, PAGE_SIZE: gl.constexpr,
    HAS_LAST_PAGE_LEN: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    P_BUFS: gl.constexpr, OUT_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
):
    q_nope_s = gl.allocate_shared_memory(q_nope_desc.dtype, q_nope_desc.block_type.shape, q_nope_desc.layout)
    q_pe_s = gl.allocate_shared_memory(q_pe_desc.dtype, q_pe_desc.block_type.shape, q_pe_desc.layout)
    kc_s = gl.allocate_shared_memory(ckv_desc.dtype, [NUM_STAGES] + ckv_desc.block_type.shape, ckv_desc.layout)
    kp_s = gl.allocate_shared_memory(kpe_desc.dtype, [NUM_STAGES] + kpe_desc.block_type.shape, kpe_desc.layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_N], gl.bfloat16)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [P_BUFS, 64, BLOCK_N], p_layout)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    alpha_s = gl.allocate_shared_memory(gl.float32, [P_BUFS, 64], vec_layout)
    fin_s = gl.allocate_shared_memory(gl.float32, [64], vec_layout)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    q_ready = gl.allocate_shared_memory(gl.int64, [1], bar)
    q_empty = gl.allocate_shared_memory(gl.int64, [1], bar)
    fin_ready = gl.allocate_shared_memory(gl.int64, [1], bar)
    fin_empty = gl.allocate_shared_memory(gl.int64, [1], bar)
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar)
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar)
    p_ready = gl.allocate_shared_memory(gl.int64, [P_BUFS, 1], bar)
    p_empty = gl.allocate_shared_memory(gl.int64, [P_BUFS, 1], bar)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=1)
    mbarrier.init(fin_ready, count=1)
    mbarrier.init(fin_empty, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    for i in gl.static_range(P_BUFS):
        mbarrier.init(p_ready.index(i), count=1)
        mbarrier.init(p_empty.index(i), count=1)

    gl.warp_specialize([
        (_softmax_wg, (kv_indptr_ptr, kv_last_page_len_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                       qk_scale, batch, num_programs, stride_o_b, stride_o_h, stride_lse_b,
                       q_nope_s, q_pe_s, kc_s, kp_s, p_s, alpha_s, fin_s,
                       q_ready, q_empty, kv_ready, kv_empty, p_ready, p_empty, fin_ready, fin_empty,
                       NUM_HEADS, HEAD_DIM_CKV, PAGE_SIZE, HAS_LAST_PAGE_LEN, BLOCK_N, NUM_STAGES, P_BUFS)),
        (_output_wg, (kv_indptr_ptr, kv_last_page_len_ptr, out_ptr, part_out_ptr, batch, num_programs,
                      stride_o_b, stride_o_h, kc_s, p_s, alpha_s, fin_s,
                      kv_ready, kv_empty, p_ready, p_empty, fin_ready, fin_empty,
                      NUM_HEADS, HEAD_DIM_CKV, PAGE_SIZE, HAS_LAST_PAGE_LEN, BLOCK_N, NUM_STAGES, P_BUFS)),
        (_loader, (q_nope_desc, q_pe_desc, ckv_desc, kpe_desc, kv_indptr_ptr, kv_indices_ptr,
                   kv_last_page_len_ptr, batch, num_programs, q_nope_s, q_pe_s, kc_s, kp_s,
                   q_ready, q_empty, kv_ready, kv_empty,
                   NUM_HEADS, PAGE_SIZE, HAS_LAST_PAGE_LEN, BLOCK_N, NUM_STAGES)),
    ], [4, 1], [OUT_REGS, LOAD_REGS])


def descriptors(q_nope, q_pe, ckv_cache, kpe_cache, block_n):
    """2-D TMA descriptors: q rows (request, head) and cache rows (page, slot)."""
    B, H, CKV = q_nope.shape
    KPE = q_pe.shape[2]
    gdt = gl.bfloat16 if q_nope.dtype == torch.bfloat16 else gl.float16

    def desc(t2, block):
        return TensorDescriptor(t2, list(t2.shape), list(t2.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, gdt))

    return (desc(q_nope.reshape(B * H, CKV), [64, CKV]), desc(q_pe.reshape(B * H, KPE), [64, KPE]),
            desc(ckv_cache.reshape(-1, CKV), [block_n, CKV]), desc(kpe_cache.reshape(-1, KPE), [block_n, KPE]))


def launch_stage1(q_nope, q_pe, ckv_cache, kpe_cache, kv_indptr, kv_indices, kv_last_page_len,
                  sm_scale, out, lse, partial_out, partial_lse, num_programs, *, block_n=64,
                  num_stages=2, p_bufs=1, out_regs=232, load_regs=40, maxnreg=None):
    B, H, CKV = q_nope.shape
    page_size = ckv_cache.shape[1]
    qd, qpd, cd, kd = descriptors(q_nope, q_pe, ckv_cache, kpe_cache, block_n)
    has_last = kv_last_page_len is not None
    grid = (num_programs * (H // 64),)
    kw = {} if maxnreg is None else {"maxnreg": maxnreg}
    _decode_stage1_ws[grid](
        qd, qpd, cd, kd, kv_indptr, kv_indices, kv_last_page_len if has_last else kv_indptr,
        out, lse, partial_out, partial_lse, sm_scale * 1.4426950408889634, B, num_programs,
        out.stride(0), out.stride(1), lse.stride(0),
        NUM_HEADS=H, HEAD_DIM_CKV=CKV, PAGE_SIZE=page_size, HAS_LAST_PAGE_LEN=has_last,
        BLOCK_N=block_n, NUM_STAGES=num_stages, P_BUFS=p_bufs, OUT_REGS=out_regs, LOAD_REGS=load_regs,
        num_warps=4, **kw)
