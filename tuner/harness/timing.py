"""Timing as ``docs/contract.md`` says: median over many runs after warm-up, L2 cleared before each
run, CUDA-graph replay of one call timed with CUDA events (:func:`time_call`).

Beside it, :func:`time_eager`: the wall time per call of many calls issued back to back without a graph,
what an engine that does not capture graphs pays per call (the host's launch work included whenever it
is longer than the GPU's).

On a machine without CUDA (the Triton interpreter) both measure wall time; such numbers mean nothing
about GPU speed and the callers say so.
"""

from __future__ import annotations

import contextlib
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


@dataclass(frozen=True)
class EagerTiming:
    """Microseconds per call: the median and the 10th/90th percentiles over ``batches`` batches of
    ``calls`` back-to-back calls each (:func:`time_eager`)."""

    median_us: float
    p10_us: float
    p90_us: float
    batches: int
    calls: int


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


EAGER_CALLS = 100  # calls per batch: enough to fill the launch queue of a short kernel
EAGER_BATCHES = 5
EAGER_MIN_CALLS = 10
EAGER_BATCH_S = 0.1  # a batch of slow calls is cut to about this long (never below EAGER_MIN_CALLS calls)


def eager_calls_for(per_call_s: float, calls: int = EAGER_CALLS, min_calls: int = EAGER_MIN_CALLS,
                    batch_s: float = EAGER_BATCH_S) -> int:
    """Calls per batch: ``calls``, fewer when ``calls`` of ``per_call_s`` seconds would take longer than
    ``batch_s``, never fewer than ``min_calls`` (nor more than ``calls``)."""
    if per_call_s <= 0:
        return calls
    return max(min(calls, min_calls), min(calls, int(batch_s / per_call_s)))


def time_eager(fn: Callable[[], object], *, device: torch.device | None = None, calls: int = EAGER_CALLS,
               batches: int = EAGER_BATCHES, warmup: int = 5, min_calls: int = EAGER_MIN_CALLS,
               batch_s: float = EAGER_BATCH_S) -> EagerTiming:
    """Wall time per call of ``fn()`` called back to back: no graph, no sync and no L2 flush between
    the calls of a batch, a sync before a batch starts and after its last call, the batch's time divided
    by its calls; median (and 10th/90th percentiles) over ``batches`` batches.

    After the warm-up calls, one timed warm-up batch estimates the time per call, and calls that are slow
    get a shorter batch (:func:`eager_calls_for`): a batch of 100 calls of 1 ms fills the queue no better
    than one of 10, and the plain-PyTorch peer takes 25 ms a call on large prefill rows.

    The calls see whatever the previous call left in the L2 cache (a flush between them would put a
    kernel in the queue), so on small rows this time can be below :func:`time_call`'s.
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batch(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            fn()
        n = eager_calls_for(batch(min(calls, min_calls)), calls, min_calls, batch_s)
        samples = [batch(n) * 1e6 for _ in range(max(1, batches))]
    t = _summarize(samples, graph=False)
    return EagerTiming(t.median_us, t.p10_us, t.p90_us, batches=t.runs, calls=n)


def _summarize(samples: list[float], graph: bool) -> Timing:
    ordered = sorted(samples)
    n = len(ordered)
    return Timing(median_us=statistics.median(ordered), p10_us=ordered[int(0.1 * (n - 1))],
                  p90_us=ordered[int(0.9 * (n - 1))], runs=n, graph=graph)
