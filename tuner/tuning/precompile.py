"""Compile tuning candidates in parallel worker processes, off the GPU's critical path.

Compiling a Triton kernel is CPU work (MLIR passes, LLVM, ptxas: seconds per candidate); timing one is
milliseconds of GPU work. So the tuner compiles candidates ahead, in a pool of worker processes that
never touch the GPU, while the GPU process times earlier candidates.

How a worker's compile becomes the GPU process's kernel: Triton keys its on-disk cache on the kernel
source, the argument specialization (dtypes, 16-byte alignment, integers equal to 1 or divisible by
16), the constexprs and the compile options. :func:`capture` runs one launch of a candidate in the GPU
process with Triton's ``knobs.runtime.jit_cache_hook`` installed: Triton calls the hook with the exact
specialization of every kernel it would compile (its ``specialization_data``) and, since the hook
returns True, neither compiles nor launches anything. A worker then calls ``JITFunction.preload`` on
that data, which compiles exactly what the GPU process would have compiled, for the captured
``GPUTarget``, into the shared cache; the GPU process's first real launch of the candidate is a cache
hit. The workers install :class:`StubDriver`, a Triton driver that only names the target, so they
never create a CUDA context (``CUDA_VISIBLE_DEVICES`` is emptied too).

Under the Triton interpreter there is nothing to compile: jobs carry no kernels and a worker only
imports the generated module.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from tuner.runtime.device import interpreting
from tuner.runtime.spec import MLASpec

_LOADED_PREFIX = "tuner._kernels."
"""tuner.runtime.loader imports a generated module under this package name."""


@dataclass(frozen=True)
class KernelJob:
    """One kernel to compile: the generated module (a spec name), the @triton.jit function in it, and
    Triton's serialized specialization (JSON, as ``JITFunction.preload`` reads it)."""

    module: str
    function: str
    specialization: str


@dataclass(frozen=True)
class CompileJob:
    """The kernels of one candidate (empty when all are compiled already, or under the interpreter)."""

    spec_name: str
    kernels: tuple[KernelJob, ...] = ()


@dataclass(frozen=True)
class CompileResult:
    """What a worker reports. ``error`` is None on success; resources are the max over the kernels.

    shared_bytes: static shared memory per program (Triton's metadata); regs / spill_bytes:
    registers per thread and stack (spill) bytes per thread read from the cubin with cuobjdump
    (-1 when unknown).
    """

    error: str | None = None
    shared_bytes: int = 0
    regs: int = -1
    spill_bytes: int = -1
    seconds: float = 0.0
    kernels: int = 0


def _triton_driver_base() -> type:
    from triton.backends.driver import DriverBase

    return DriverBase


def make_stub_driver(target: Any) -> Any:
    """A Triton driver that only knows its compile target: enough for ``JITFunction.preload`` (and
    for capturing specializations from CPU tensors in tests), with no GPU and no CUDA context."""
    base = _triton_driver_base()

    class StubDriver(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.target = target
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.set_current_device = lambda device: None

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("StubDriver compiles only")

        def get_current_target(self) -> Any:
            return self.target

        def get_active_torch_device(self) -> Any:
            import torch

            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            raise NotImplementedError("StubDriver compiles only")

    return StubDriver()


def current_target() -> Any:
    """The GPUTarget of the current CUDA device (what the GPU process's kernels compile for)."""
    from triton.runtime.driver import driver

    return driver.active.get_current_target()


def capture(spec: MLASpec, launch: Callable[[], object]) -> CompileJob:
    """Run ``launch()`` once with compilation and launching suppressed, and return the kernels it
    would have compiled (those not yet in this process's in-memory Triton cache).

    Under the interpreter nothing is captured and nothing runs (there is no compile step).
    Exceptions from ``launch`` (an invalid config, say) propagate.
    """
    if interpreting():
        return CompileJob(spec.name())
    import triton

    kernels: list[KernelJob] = []

    def hook(*, key: Any, repr: str, fn: Any, compile: dict[str, Any], is_manual_warmup: bool,
             already_compiled: bool) -> bool:
        module = fn.module[len(_LOADED_PREFIX):] if fn.module.startswith(_LOADED_PREFIX) else fn.module
        kernels.append(KernelJob(module, fn.name, compile["specialization_data"]))
        return True  # skip compiling (and so launching) in this process

    previous = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = hook
    try:
        launch()
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    return CompileJob(spec.name(), tuple(kernels))


_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: spills) from cuobjdump, or (-1, -1)."""
    try:
        import triton

        tool = triton.knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                                  timeout=60, check=True).stdout
    except Exception:  # noqa: BLE001 - the numbers are informative only
        return -1, -1
    found = _RES_RE.findall(text)
    if not found:
        return -1, -1
    return max(int(r) for r, _ in found), max(int(stack) for _, stack in found)


def _error_text(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-3:]) if lines else ""
    return f"{type(err).__name__}: {tail}"[:600]


def compile_job(job: CompileJob) -> CompileResult:
    """Compile every kernel of ``job`` into Triton's cache (runs in a worker process)."""
    from tuner.runtime.loader import load_module

    start = time.perf_counter()
    try:
        module = load_module(MLASpec.from_name(job.spec_name))
        shared, regs, spill = 0, -1, -1
        for kernel in job.kernels:
            if kernel.module != job.spec_name:
                module_k = load_module(MLASpec.from_name(kernel.module))
            else:
                module_k = module
            compiled = getattr(module_k, kernel.function).preload(kernel.specialization)
            shared = max(shared, int(compiled.metadata.shared))
            if "cubin" in compiled.asm:
                r, stack = _resource_usage(compiled.asm["cubin"])
                regs, spill = max(regs, r), max(spill, stack)
    except Exception as err:  # noqa: BLE001 - every compile failure is a pruned candidate
        return CompileResult(error=_error_text(err), seconds=time.perf_counter() - start,
                             kernels=len(job.kernels))
    return CompileResult(shared_bytes=shared, regs=regs, spill_bytes=spill,
                         seconds=time.perf_counter() - start, kernels=len(job.kernels))


def _init_worker(target: Any) -> None:
    """Pool initializer: no GPU, no SIGINT (the parent handles Ctrl-C), a compile-only driver."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if target is not None:
        from triton.runtime.driver import driver

        driver.set_active(make_stub_driver(target))


def default_workers() -> int:
    """Compile processes: all cores but two (the GPU process and the system), at least one."""
    return max(1, min(14, (os.cpu_count() or 2) - 2))


class CompilePool:
    """A pool of compile worker processes (spawned: the parent holds a CUDA context)."""

    def __init__(self, workers: int, target: Any) -> None:
        self.workers = workers
        self.target = target
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.target,))

    def submit(self, job: CompileJob) -> Future[CompileResult]:
        return self._executor.submit(compile_job, job)

    def restart(self) -> None:
        """Replace a broken pool (a worker died, e.g. a crash inside the compiler)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
