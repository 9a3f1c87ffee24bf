"""Measuring one candidate config on one bucket: its inputs, the correctness gate and the timing.

:class:`Bench` holds a bucket's representative workload on the device twice: the timing inputs, and
fresh inputs (another seed: other values and another page permutation) with their float32 reference
for the correctness gate. A candidate runs through the public runtime API (``tuner.mla_decode`` /
``tuner.mla_prefill`` with ``config=``), so it is measured exactly as it will run, host-side split
policy included. No optuna here: :mod:`tuner.tuning.search` drives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from tuner.harness.check import check
from tuner.harness.floors import Ceilings, floor_us, measure_ceilings
from tuner.harness.inputs import FP8, Inputs, Workload, make_inputs
from tuner.harness.reference import mla_decode_ref, mla_prefill_ref
from tuner.harness.timing import Timing, time_call
from tuner.runtime.config import Config, DecodeConfig, PrefillConfig
from tuner.runtime.decode import mla_decode
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import untuned_config
from tuner.runtime.prefill import mla_prefill
from tuner.runtime.spec import MLASpec

from .space import Limits


def device_limits(device: torch.device) -> Limits:
    """Shared memory a block may use on ``device`` (:attr:`GPUInfo.shared_bytes`: the H100's figure
    under the interpreter, so that pruning behaves as on an H100)."""
    return Limits(shared_bytes=gpu_info(device).shared_bytes)


def measure_floors(device: torch.device) -> Ceilings | None:
    """The copy bandwidth and bf16 matmul rate the floors are made of, measured as ``mla-tune bench``
    measures them (a few seconds); None under the interpreter, where floors mean nothing."""
    if device.type != "cuda":
        return None
    return measure_ceilings(device, torch.bfloat16, runs=20)


def compare(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> str | None:
    """Why ``out``/``lse`` fail the correctness rule (:mod:`tuner.harness.check`), or None."""
    verdict = check(out, lse, ref_out, ref_lse)
    return None if verdict.passed else verdict.reason


class Bench:
    """One kernel specialization on one workload.

    Args:
        spec: the kernel; workload: its batch (heads and head dims must match the spec).
        device: where to run; dtype: bf16 on a GPU (fp16 under the interpreter, which has no bf16 dot).
        seed: the timing inputs' seed (the gate uses seed + 1).
        gate: build the gate's inputs and float32 reference (False: a bench that only times, like the
            finalists' check batches: it saves a reference and a second set of inputs per study).
    """

    def __init__(self, spec: MLASpec, workload: Workload, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0, gate: bool = True) -> None:
        if replace(workload.spec(spec.page_size), fp8=spec.fp8) != spec:
            raise ValueError(f"workload: expected one of {spec.name()}, found {workload.spec(spec.page_size).name()}")
        self.spec, self.workload, self.device = spec, workload, device
        info = gpu_info(device)
        self.num_sms = info.num_sms
        self.ws_runs = info.hopper  # a ws=1 config runs the Gluon kernel here, else falls back
        kv_dtype = FP8 if spec.fp8 else None  # an fp8 spec: the same values over an fp8 cache, with its scales
        self.inputs = make_inputs(workload, spec.page_size, dtype, device, seed, kv_dtype=kv_dtype)
        rows, heads = self.inputs.q_nope.shape[:2]
        self.out = torch.empty(rows, heads, spec.head_dim_ckv, dtype=dtype, device=device)
        self.lse = torch.empty(rows, heads, dtype=torch.float32, device=device)
        self.gate_inputs: Inputs | None = None
        if not gate:
            return
        self.gate_inputs = g = make_inputs(workload, spec.page_size, dtype, device, seed + 1, kv_dtype=kv_dtype)
        if spec.is_decode:
            self.ref = mla_decode_ref(g.q_nope, g.q_pe, g.ckv_cache, g.kpe_cache, g.kv_indptr, g.kv_indices,
                                      g.sm_scale, g.kv_last_page_len, **g.scales)
        else:
            assert g.qo_indptr is not None
            self.ref = mla_prefill_ref(g.q_nope, g.q_pe, g.ckv_cache, g.kpe_cache, g.qo_indptr, g.kv_indptr,
                                       g.kv_indices, g.sm_scale, g.kv_last_page_len, causal=spec.causal, **g.scales)

    def default_config(self) -> Config:
        """The runtime's default for this workload (what an untuned GPU runs)."""
        w = self.workload
        return untuned_config(self.spec, w.total_q, w.avg_kv_len, gpu_info(self.device))

    def _call(self, config: Config, x: Inputs, out: torch.Tensor, lse: torch.Tensor) -> object:
        if self.spec.is_decode:
            assert isinstance(config, DecodeConfig)
            return mla_decode(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.kv_indptr, x.kv_indices, x.sm_scale,
                              x.kv_last_page_len, out=out, lse=lse, config=config, **x.scales)
        assert isinstance(config, PrefillConfig) and x.qo_indptr is not None
        return mla_prefill(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.qo_indptr, x.kv_indptr, x.kv_indices,
                           x.sm_scale, x.kv_last_page_len, causal=self.spec.causal, out=out, lse=lse, config=config,
                           **x.scales)

    def launcher(self, config: Config) -> Callable[[], object]:
        """A closure that launches ``config`` on the timing inputs (graph-capturable)."""
        return lambda: self._call(config, self.inputs, self.out, self.lse)

    def effective_key(self, config: Config) -> tuple[int, ...]:
        """What the device runs: configs with equal keys launch identical work on this workload (the
        decode split policy reaches the device only as the number of shares; the warp-specialized kernel
        has fixed warps and its own copies, and where it cannot run ws=1 is the Triton kernel)."""
        data = config.to_dict()
        if config.ws and self.ws_runs:
            data["num_warps"] = data["tma"] = 0
        elif config.ws:
            data["ws"] = 0
        if isinstance(config, DecodeConfig):
            max_tokens = self.inputs.kv_indices.numel() * self.spec.page_size
            data["programs_per_sm"] = config.num_programs(self.spec, self.num_sms, max_tokens,
                                                          self.inputs.q_nope.shape[0])
            data["split_tokens"] = data["align"] = 0
        return tuple(data.values())

    def check(self, config: Config) -> str | None:
        """Run ``config`` on the fresh inputs into NaN-filled outputs; None when it matches the reference."""
        if self.gate_inputs is None:
            raise RuntimeError(f"{self.workload.name}: a bench made with gate=False only times")
        out = torch.full_like(self.out, float("nan"))
        lse = torch.full_like(self.lse, float("nan"))
        self._call(config, self.gate_inputs, out, lse)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return compare(out, lse, *self.ref)

    def time(self, config: Config, runs: int, warmup: int = 3) -> Timing:
        """Median of ``runs`` CUDA-graph replays with L2 flushed (wall time under the interpreter)."""
        return time_call(self.launcher(config), device=self.device, runs=runs, warmup=warmup)

    def floor_us(self, floors: Ceilings | None) -> float:
        """max(bytes / copy bandwidth, FLOPs / matmul rate) of the workload, in µs (NaN without floors)."""
        if floors is None:
            return math.nan
        return floor_us(self.workload.bytes_moved(self.inputs.q_nope.element_size(),
                                                   self.inputs.ckv_cache.element_size()), self.workload.flops(),
                        floors.copy_bytes_per_s, floors.matmul_flops_per_s)
