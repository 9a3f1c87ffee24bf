"""The roofline floors: the copy bandwidth and matmul rate of the GPU, measured, and the floor of a
workload, max(bytes / copy bandwidth, FLOPs / matmul rate), with the achieved rates and ratios."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuner.harness.timing import time_call

GPU_COPY_BYTES = 1 << 30
GPU_MATMUL_N = 8192
CPU_COPY_BYTES = 32 << 20
CPU_MATMUL_N = 256



def floor_us(bytes_moved: float, flops: float, copy_bytes_per_s: float, matmul_flops_per_s: float) -> float:
    """The least time the row can take: max(bytes / copy bandwidth, FLOPs / matmul rate), in µs."""
    return max(bytes_moved / copy_bytes_per_s, flops / matmul_flops_per_s) * 1e6


def achieved(bytes_moved: float, flops: float, us: float) -> tuple[float, float]:
    """(GB/s, TFLOP/s) of a row that took ``us`` microseconds."""
    return bytes_moved / us * 1e-3, flops / us * 1e-6


def floor_fraction(floor: float, us: float) -> float:
    """floor / time: 1.0 is the measured ceiling."""
    return floor / us


def ratio(ours_us: float | None, peer_us: float | None) -> float | None:
    """ours / peer time (below 1: ours is faster); None when either is missing."""
    if ours_us is None or peer_us is None or peer_us <= 0:
        return None
    return ours_us / peer_us


@dataclass(frozen=True)
class Ceilings:
    """Measured in the run: device-to-device copy bandwidth (bytes read + written per second) and the
    matmul rate (FLOP/s) of an n^3 torch.matmul in the benchmark's dtype on random data."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int
    matmul_n: int


def measure_ceilings(device: torch.device, dtype: torch.dtype, runs: int) -> Ceilings:
    big = device.type == "cuda"
    n_bytes = GPU_COPY_BYTES if big else CPU_COPY_BYTES
    src = torch.full((n_bytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # Not in a CUDA graph: a captured device-to-device copy can become a memcpy node served by the copy
    # engines (measured 2.45 TB/s on the H100 against 3.0 TB/s for the copy kernel).
    t_copy = time_call(lambda: dst.copy_(src), device=device, runs=runs, warmup=3, graph=False, flush_l2=False)
    n = GPU_MATMUL_N if big else CPU_MATMUL_N
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty_like(a)
    t_mm = time_call(lambda: torch.matmul(a, b, out=c), device=device, runs=runs, warmup=3, flush_l2=False)
    return Ceilings(2 * n_bytes / (t_copy.median_us * 1e-6), 2 * n**3 / (t_mm.median_us * 1e-6), n_bytes, n)
