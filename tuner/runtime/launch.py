"""A call's kernel launches resolved once, then replayed: the lean launch path of ``run()``.

Launching through Triton's JIT costs host time on every call: binding and specializing each argument,
looking the compiled kernel up, and, in the generated modules' ``launch()``, building tensor descriptors
and deciding which kernel runs. None of it changes while the tensors' metadata does not. So the first
call with a given metadata *records* its launches (:func:`record`): ``launch()`` runs normally, and each
kernel launch is captured with the compiled kernel it resolved to, its grid and its full argument list.
Later calls with the same metadata *replay* them (:class:`Replay`): the compiled kernels are launched
directly with this call's tensors put in the places the recorded call's tensors had.

Correct by construction, as long as the caller keys replays by everything a launch depends on: every
tensor's shape, strides, dtype, device and 16-byte alignment (what Triton specializes on), and every
scalar. :func:`call_key` is that key. A recording is refused (None: the caller then
launches through ``launch()`` every time) when a launch receives a tensor that is not one of the call's
tensors (a tensor made inside ``launch()`` would be replayed stale).

Under the Triton interpreter a launch resolves to no compiled kernel; the replay then launches the
interpreted kernel with the recorded arguments, so the CPU tests run this same path.
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from triton import knobs

from . import paths
from .loader import load_module
from .spec import MLASpec

_local = threading.local()
_WRAPPED = "_mla_tuner_recordable"


def call_key(*tensors: torch.Tensor | None) -> tuple | None:
    """The metadata key of a call's tensors (None stays None; None when an argument is not a tensor)."""
    try:
        return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, not t.data_ptr() & 15)
                      for t in tensors])
    except AttributeError:
        return None


def scaled_key(metadata: tuple | None, ckv_scale: object, kpe_scale: object) -> tuple | None:
    """A call's replay key: its tensors' metadata (:func:`call_key`), and an fp8 cache's scales where given
    (a float's value and type, a tensor's metadata: its value is read on the device)."""
    if metadata is None or (ckv_scale is None and kpe_scale is None):
        return metadata
    return metadata, tuple((s.dtype, s.device, s.shape) if isinstance(s, torch.Tensor) else (s, type(s))
                           for s in (ckv_scale, kpe_scale))


def _is_kernel(obj: object) -> bool:
    run = getattr(type(obj), "run", None)
    return callable(run) and hasattr(obj, "arg_names") and hasattr(obj, "fn")


def make_recordable(module: ModuleType) -> None:
    """Let :func:`record` see the launches of ``module``'s kernels (idempotent).

    Each Triton or Gluon function of the module gets an instance-level ``run`` that calls the class's
    and, while this thread records, appends the launch. Device functions are never ``run`` (the compiler
    inlines them), so wrapping every function of the module is harmless.
    """
    if getattr(module, _WRAPPED, False):
        return
    for obj in list(vars(module).values()):
        if _is_kernel(obj) and "run" not in vars(obj):
            obj.run = _recording_run(obj)
    setattr(module, _WRAPPED, True)


def _recording_run(kernel: Any) -> Callable[..., Any]:
    run = type(kernel).run

    def recording_run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        compiled = run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        steps = getattr(_local, "steps", None)
        if steps is not None and not warmup:
            steps.append((kernel, compiled, grid, args, kwargs))
        return compiled

    return recording_run


class _Interpreted:
    """The interpreter's stand-in for a compiled kernel: ``self[grid](*args)`` runs the kernel."""

    def __init__(self, kernel: Any, options: dict[str, Any]) -> None:
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        names = self.kernel.arg_names
        return lambda *args: self.kernel[grid](**dict(zip(names, args, strict=True)), **self.options)


def _with_base(template: Any, base: torch.Tensor | None) -> Any:
    """A copy of a recorded tensor descriptor over ``base`` (no validation: the metadata is the recorded one;
    None: a template that holds no reference to the recorded call's tensor)."""
    desc = object.__new__(type(template))
    if hasattr(template, "__dict__"):
        desc.__dict__.update(template.__dict__)
    else:
        desc = copy.copy(template)
    object.__setattr__(desc, "base", base)
    return desc


class _Step:
    """One recorded launch: the compiled kernel, its (x, y, z) grid, the argument list with this call's
    tensors left out, and where they go (tensors directly, tensor descriptors over them).

    A descriptor is rebuilt only when its base is another tensor object than the last call's (a serving
    engine passes the same cache tensors every step): its shape and strides are the recorded ones (the key
    says so) and its base's address is read at each launch, so the same base object gives the same
    descriptor. The step holds the last base alive until another replaces it."""

    __slots__ = ("compiled", "grid", "template", "tensors", "descriptors", "last", "launcher", "function",
                 "metadata")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], template: list[Any],
                 slots: list[tuple[int, int, bool]]) -> None:
        self.compiled, self.grid, self.template = compiled, grid, template
        self.tensors = [(pos, index) for pos, index, is_desc in slots if not is_desc]
        self.descriptors = [(pos, index) for pos, index, is_desc in slots if is_desc]
        self.last: list[Any] = [None] * len(self.descriptors)  # each descriptor of the last call
        # A compiled kernel's own launcher (what its [grid] runner calls), where Triton made one.
        self.launcher = getattr(compiled, "run", None)
        self.function = getattr(compiled, "function", None)
        self.metadata = getattr(compiled, "packed_metadata", None)

    def arguments(self, tensors: Sequence[torch.Tensor | None]) -> list[Any]:
        args = self.template.copy()
        for pos, index in self.tensors:
            args[pos] = tensors[index]
        for i, (pos, index) in enumerate(self.descriptors):
            base, desc = tensors[index], self.last[i]
            if desc is None or desc.base is not base:  # (read once: another thread may replace it)
                desc = self.last[i] = _with_base(args[pos], base)
            args[pos] = desc
        return args


class Replay:
    """Recorded launches; ``replay(tensors)`` launches them with these tensors in the recorded places.

    On a GPU each compiled kernel is launched through its ``[grid]`` runner (the current stream, the launch
    hooks), as Triton's JIT launches it once the kernel is resolved. A call returns False, launching
    nothing, when the current device is not the recorded one (its kernels are loaded there only).
    """

    direct = True
    """Call the compiled kernels' launchers directly (one device and stream lookup per call, not per launch;
    the launch hooks and their data passed as the ``[grid]`` runner passes them) instead of the runners.
    False: the runners (``perf/host_probe.py`` times both)."""

    def __init__(self, steps: list[_Step], device: int | None) -> None:
        self.steps, self.device = steps, device
        self._driver = None
        if device is not None:
            from triton.runtime import driver

            self._driver = driver.active
            self._current_device = self._driver.get_current_device
            self._current_stream = self._driver.get_current_stream

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> bool:
        if self._driver is not None:
            device = self._current_device()
            if device != self.device:
                return False
        if self._driver is None or not self.direct or self.steps[0].launcher is None:  # the [grid] runners
            for step in self.steps:  # (under the interpreter, its stand-ins)
                step.compiled[step.grid](*step.arguments(tensors))
            return True
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        stream = self._current_stream(device)
        for step in self.steps:
            args = step.arguments(tensors)
            x, y, z = step.grid
            hook_data = step.compiled.launch_metadata(step.grid, stream, *args)
            step.launcher(x, y, z, stream, step.function, step.metadata, hook_data, enter, leave, *args)
        return True


def record(launch: Callable[[], None], tensors: Sequence[torch.Tensor | None]) -> Replay | None:
    """Run ``launch()`` once and record its kernel launches; None where they cannot be replayed.

    ``tensors``: every tensor the launches may receive (directly or as a tensor descriptor's base);
    a replay takes the same sequence, in the same order.
    """
    places = {id(t): i for i, t in reversed(list(enumerate(tensors))) if t is not None}
    _local.steps = []
    try:
        launch()
        recorded = _local.steps
    finally:
        _local.steps = None
    steps = []
    for kernel, compiled, grid, args, kwargs in recorded:
        signature = inspect.signature(kernel.fn)
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        bound.apply_defaults()
        template = list(bound.arguments.values())
        slots = []
        for pos, arg in enumerate(template):
            if isinstance(arg, torch.Tensor):
                is_desc, base = False, arg
            elif isinstance(getattr(arg, "base", None), torch.Tensor):
                is_desc, base = True, arg.base
            else:
                continue
            if id(base) not in places:
                return None  # a tensor of launch()'s own: a replay would pass it stale
            slots.append((pos, places[id(base)], is_desc))
            # hold no reference to this call's tensors
            template[pos] = _with_base(arg, None) if is_desc else None
        interpreted = compiled is None
        if interpreted:
            compiled = _Interpreted(kernel, {k: v for k, v in kwargs.items() if k not in signature.parameters})
        if callable(grid):
            return None
        grid = (*grid, 1, 1)[:3]  # (x, y, z), as the JIT hands it to a compiled kernel
        steps.append(_Step(compiled, grid, template, slots))
    if not steps or interpreted:
        return Replay(steps, None)
    from triton.runtime import driver

    return Replay(steps, driver.active.get_current_device())


Launch = Callable[[Sequence[torch.Tensor | None]], None]
"""A call's launches given its tensors (a :class:`Replay`, or ``launch()`` itself where none records)."""


class Launches:
    """The launches of one plan by tensor-metadata key: recorded on a key's first call, then replayed.

    At most ``limit`` keys are kept (all are forgotten when a new one would exceed it).
    """

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._by_key: dict[Any, Launch] = {}

    def get(self, key: Any) -> Launch | None:
        return self._by_key.get(key) if key is not None else None

    def first(self, key: Any, launch: Launch, tensors: Sequence[torch.Tensor | None]) -> None:
        """Launch ``launch(tensors)`` (validated), recording it for later calls with ``key``."""
        replay = record(lambda: launch(tensors), tensors)
        if key is None:
            return
        if len(self._by_key) >= self.limit:
            self._by_key.clear()
        self._by_key[key] = replay if replay is not None else launch


class Plans:
    """A bounded cache of the one-call forms' plans, by everything a plan depends on.

    The dispatch a plan's config came from is part of that: the cache is emptied when the environment
    that selects the tables and the GPU key changes, or when :func:`forget_plans` is called (on
    ``tuner.runtime.dispatch.reload()``).
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._by_key: dict[Any, Any] = {}
        self._epoch: tuple = ()

    def get(self, key: Any) -> Any:
        """The plan of ``key`` or None (TypeError when ``key`` is unhashable)."""
        epoch = (_generation[0], os.environ.get(paths.ENV_GENERATED_DIR), os.environ.get(paths.ENV_GPU_KEY))
        if epoch != self._epoch:
            self._by_key.clear()
            self._epoch = epoch
        return self._by_key.get(key)

    def put(self, key: Any, plan: Any) -> None:
        if len(self._by_key) >= self.limit:
            self._by_key.clear()
        self._by_key[key] = plan


_generation = [0]


def forget_plans() -> None:
    """Forget every one-call plan (their configs came from dispatch tables that may have changed)."""
    _generation[0] += 1


class LaunchPlan:
    """What a call needs besides its tensors: the generated module, the config's launch arguments, the
    output rows, and the launches recorded per tensor-metadata key (:class:`Launches`)."""

    def __init__(self, spec: MLASpec, rows: int, sm_scale: float, device: torch.device,
                 kwargs: dict[str, Any]) -> None:
        self.spec, self.rows, self.sm_scale, self.device, self.kwargs = spec, rows, sm_scale, device, kwargs
        self.module = load_module(spec)
        self.launches = Launches()

    def outputs(self, dtype: torch.dtype, out: torch.Tensor | None,
                lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``out`` and ``lse``, allocated where not given."""
        spec = self.spec
        if out is None:
            out = torch.empty(self.rows, spec.num_heads, spec.head_dim_ckv, dtype=dtype, device=self.device)
        if lse is None:
            lse = torch.empty(self.rows, spec.num_heads, dtype=torch.float32, device=self.device)
        return out, lse

    def run(self, key: Any, tensors: Sequence[torch.Tensor | None]) -> None:
        """Launch (validated tensors): the replay recorded for ``key``, else record one."""
        replay = self.launches.get(key)
        if replay is None:
            self.launches.first(key, self.launch, tensors)
        elif replay(tensors) is False:  # another current device than the recorded one
            self.launch(tensors)

    def launch(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """The generated module's launch of these tensors."""
        raise NotImplementedError

    def scale_values(self, ckv_scale: Any, kpe_scale: Any) -> tuple:
        """The values a launch takes after a call's tensors: an fp8 cache's two scales (none for a 16-bit one)."""
        return (ckv_scale, kpe_scale) if self.spec.fp8 else ()

    def scales(self, extra: Sequence[Any]) -> dict[str, Any]:
        """launch()'s keyword arguments of an fp8 cache's scales, the two values after a call's tensors (none
        for a 16-bit cache)."""
        return {"ckv_scale": extra[0], "kpe_scale": extra[1]} if self.spec.fp8 else {}
