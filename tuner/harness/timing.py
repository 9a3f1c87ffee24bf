"""Timing as ``docs/contract.md`` says: median over many runs after warm-up, L2 cleared before each
run, CUDA-graph replay of one call timed with CUDA events.

On a machine without CUDA (the Triton interpreter) :func:`time_call` measures wall time; such numbers
mean nothing about GPU speed and the callers say so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100 50 MB, H200 60 MB)


@dataclass(frozen=True)
class Timing:
    """Microseconds: the median and the 10th/90th percentiles over ``runs`` timed runs."""

    median_us: float
    p10_us: float
    p90_us: float
    runs: int
    graph: bool


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[device]


def time_call(fn: Callable[[], object], *, device: torch.device | None = None, runs: int = 100,
              warmup: int = 5, graph: bool = True, flush_l2: bool = True) -> Timing:
    """Time ``fn()`` (which must only launch work: no host sync inside when ``graph``)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return _summarize(samples, graph=False)

    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        call = fn
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # warm the allocator on the capture stream
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            call = g.replay
        flush = _flush_buffer(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for i in range(runs):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            call()
            ends[i].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    return _summarize(samples, graph=graph)


def _summarize(samples: list[float], graph: bool) -> Timing:
    ordered = sorted(samples)
    n = len(ordered)
    return Timing(median_us=statistics.median(ordered), p10_us=ordered[int(0.1 * (n - 1))],
                  p90_us=ordered[int(0.9 * (n - 1))], runs=n, graph=graph)
