"""What the runtime needs to know about the GPU, read once per device (host queries, no sync)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch

from . import paths

H100_SHARED_BYTES = 232448
"""Shared memory one block may use on an H100 or H200 (227 KB, the opt-in maximum); the one source of
the figure: ``tuner.codegen`` renders it into the generated modules as ``WS_SHARED_BYTES``."""

CPU_NUM_SMS = 4
"""Programs in flight assumed for the Triton interpreter (only shapes the split heuristic)."""


@dataclass(frozen=True)
class GPUInfo:
    """Identity of a device for dispatch lookups.

    key: a file-name-safe name (``nvidia-h100-80gb-hbm3``); capability: ``"9.0"``; num_sms: multiprocessors;
    shared_bytes: shared memory one block may use (the opt-in maximum; the H100's under the interpreter).
    """

    key: str
    name: str
    capability: str
    num_sms: int
    shared_bytes: int = H100_SHARED_BYTES

    @property
    def hopper(self) -> bool:
        """A Hopper GPU (compute capability 9.x): where the warp-specialized Gluon kernels run (what a
        generated module checks, ``_cc_major(t) == 9``, for tensors on this device)."""
        return self.capability.startswith("9.")

    def describe(self) -> str:
        """One line for reports: ``NVIDIA H200 (nvidia-h200, capability 9.0, 132 SMs)``; the interpreter
        has no multiprocessors, only the programs in flight its split heuristic assumes."""
        if self.capability == "cpu":
            return f"{self.name} ({self.key}; no GPU: split sizes assume {self.num_sms} programs in flight)"
        return f"{self.name} ({self.key}, capability {self.capability}, {self.num_sms} SMs)"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def _gpu_info(device_index: int | None) -> GPUInfo:
    if device_index is None:
        key = os.environ.get(paths.ENV_GPU_KEY, "cpu-interpreter")
        return GPUInfo(key=key, name="Triton interpreter (CPU)", capability="cpu", num_sms=CPU_NUM_SMS)
    props = torch.cuda.get_device_properties(device_index)
    key = os.environ.get(paths.ENV_GPU_KEY) or _slug(props.name)
    from triton.runtime.driver import driver  # the figure Triton checks a kernel against at load time

    shared = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return GPUInfo(key=key, name=props.name, capability=f"{props.major}.{props.minor}",
                   num_sms=props.multi_processor_count, shared_bytes=int(shared))


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET``, read on each call)."""
    import triton  # only on the paths that ask: importing the runtime does not import triton

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get(paths.ENV_TRITON_INTERPRET, "").strip() not in ("", "0")


def cuda_index(device: torch.device) -> int:
    """The CUDA device that ``device`` names: its own index (a tensor's device always has one: the
    device a generated module queries, ``_cc_major(t)``, keyed by ``t.device.index``), or for a bare
    ``cuda`` the current device (where torch puts a tensor made on it)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_info(device: torch.device | str | None = None) -> GPUInfo:
    """GPUInfo of ``device``: pass the tensors' device (``q_nope.device``), so that it describes the GPU
    the kernels run on and whose capability the generated module checks. Default: the current CUDA
    device, or the interpreter without CUDA."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return _gpu_info(None)
    return _gpu_info(cuda_index(device))
