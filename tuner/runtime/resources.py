"""The resource model of one launch config: the shared memory and accumulator registers a kernel
needs. The runtime uses it to shrink a default config to a smaller GPU; the tuner prunes with it before
compiling.

It was calibrated against Triton 3.6 compiles for sm_90 (``metadata.shared`` and cuobjdump's
register/stack counts, ckv 512 + kpe 64, bf16) and is a lower bound of the shared memory the compiled
kernel asks for; the tuner checks the compiled kernel's exact figure before it runs anything:

- a tile whose M dimension (rows: decode's block_h, prefill's block_m * block_h) is at least 64 is
  lowered to wgmma, which keeps ``num_stages`` KV tiles in flight; smaller tiles use mma.sync with
  ``num_stages - 1``; either way the query tile (rows x (ckv + kpe)) stays in shared memory, and
  decode at 64 rows also stages its fp32 partial output (rows x ckv x 4 bytes) there;
- the fp32 accumulator (rows x ckv) is spread over num_warps * 32 threads: above 128 registers per
  thread it spills kilobytes (measured), so such configs are pruned;
- over an fp8 cache the staged KV tiles count one byte an element (as loaded; not calibrated against
  compiles: 64-token tiles at 4 stages below 64 heads and 3 at 64 compiled and ran on the H200).
"""

from __future__ import annotations

from dataclasses import replace

from .config import Config, DecodeConfig, PrefillConfig, ws_narrow
from .spec import MLASpec

SHARED_MARGIN = 4096
"""Bytes the compiled kernel may use beyond :func:`shared_bytes_estimate` (measured: 0-2 KB)."""

MAX_ACC_REGS = 128
"""fp32 accumulator registers per thread above which a config is pruned (of 255)."""

def shared_bytes_estimate(spec: MLASpec, config: Config, itemsize: int = 2) -> int:
    """Shared memory of the main kernel (a lower bound; see the module docstring)."""
    width = spec.head_dim_ckv + spec.head_dim_kpe
    if config.ws:  # the generated module's ws_shared_bytes with 1 P buffer, less its vectors and barriers
        q_rows = spec.num_heads if ws_narrow(spec) else 64  # its WS_Q_ROWS: below 64 heads, the heads
        return ((q_rows + config.num_stages * config.block_n) * width + q_rows * config.block_n) * itemsize
    rows = config.block_h if isinstance(config, DecodeConfig) else config.rows
    wgmma = rows >= 64
    buffers = max(1, config.num_stages if wgmma else config.num_stages - 1)
    kv_itemsize = 1 if spec.fp8 else itemsize  # an fp8 cache's tiles are staged as they are loaded
    smem = rows * width * itemsize + buffers * config.block_n * width * kv_itemsize
    if wgmma and isinstance(config, DecodeConfig):
        smem = max(smem, rows * spec.head_dim_ckv * 4)
    return smem


def shared_margin(config: Config) -> int:
    """What the compiled kernel may use beyond the estimate: SHARED_MARGIN, or 512 bytes for the
    warp-specialized stage 1, whose buffers are all explicit (measured: 190-230 bytes of barriers)."""
    return 512 if config.ws else SHARED_MARGIN


def fit_shared_memory(spec: MLASpec, config: Config, shared_bytes: int, itemsize: int = 2) -> Config:
    """``config``, made smaller until its shared memory fits ``shared_bytes`` (for the default configs,
    written for a Hopper's 227 KB, on GPUs with less): fewer stages first, then smaller KV tiles, then
    fewer rows per program. Returns ``config`` itself when it fits; the smallest config it can make
    otherwise (whose compile then says what does not fit)."""
    def fits(c: Config) -> bool:
        return shared_bytes_estimate(spec, c, itemsize) + shared_margin(c) <= shared_bytes

    while not fits(config):
        if config.num_stages > 1:
            config = replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > 16:
            config = replace(config, block_n=config.block_n // 2)
        elif isinstance(config, PrefillConfig) and config.block_m > 1:
            config = replace(config, block_m=config.block_m // 2)
        elif config.block_h > 16 or (isinstance(config, PrefillConfig) and config.block_h > 1):
            config = replace(config, block_h=config.block_h // 2)
        else:
            break
    return config


def acc_registers(spec: MLASpec, config: Config) -> float:
    """fp32 accumulator registers per thread of the main kernel."""
    if config.ws:  # [64, ckv / 2] per warpgroup
        return 64 * spec.head_dim_ckv / 2 / 128
    rows = config.block_h if isinstance(config, DecodeConfig) else config.rows
    return rows * spec.head_dim_ckv / (config.num_warps * 32)


def merge_registers(config: DecodeConfig) -> float:
    """fp32 registers per thread of the stage-2 merge tile (a partial output and its rescaled copy)."""
    return 2 * config.merge_block_h * config.merge_block_d / (config.merge_num_warps * 32)


def infeasible(spec: MLASpec, config: Config, shared_bytes: int, itemsize: int = 2) -> str | None:
    """Why ``config`` cannot run well on ``spec`` with ``shared_bytes`` of shared memory per block, or None:
    the spec's own rules (``check_spec``), then the resource model (shared memory, accumulator and merge
    registers) and the split rule of the warp-specialized stage 1. The tuner prunes candidates with it;
    the runtime checks the configs it derives from other shapes' entries with it."""
    try:
        config.check_spec(spec)
    except ValueError as err:
        return str(err)
    smem = shared_bytes_estimate(spec, config, itemsize)
    if smem > shared_bytes:
        return f"shared memory: needs at least {smem} bytes, the GPU allows {shared_bytes}"
    regs = acc_registers(spec, config)
    if regs > MAX_ACC_REGS:
        return f"registers: the fp32 accumulator needs {regs:.0f} per thread (> {MAX_ACC_REGS}: spills)"
    if isinstance(config, DecodeConfig):
        if config.ws and config.programs_per_sm > 1:  # (DecodeConfig.num_programs takes it as 1: a duplicate)
            return "programs_per_sm: the warp-specialized stage 1 runs one program per multiprocessor"
        if merge_registers(config) > MAX_ACC_REGS:
            return f"registers: the merge tile needs {merge_registers(config):.0f} per thread (> {MAX_ACC_REGS})"
    return None
