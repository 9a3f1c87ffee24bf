"""The tuning search: one Optuna study per (GPU, kernel, bucket), a pipelined objective, workers.

Flow of one study (:func:`run_study`), in Optuna's ask/tell form so that the GPU never waits for the
compiler:

    ask -> suggest a point of the space (tuner.tuning.space) -> prune if infeasible
        -> reuse the value of an identical launch already measured (a duplicate)
        -> capture the kernels to compile and hand them to a compile worker (tuner.tuning.precompile)
    ... while workers compile, the GPU process takes the first candidate whose compile is done:
        compile error / out of resources -> pruned, the reason in the trial's user attrs
        -> correctness gate on fresh inputs against the float32 reference (tuner.tuning.measure)
        -> time (CUDA-graph replay, L2 flushed, median) -> tell

The default config is the first trial of every study (``enqueue_trial``). ``--trials N`` counts the
candidates measured (trial outcome ``ok``, ``compile_error``, ``out_of_resources``, ``incorrect``,
``launch_error``, ``timeout``); infeasible points and duplicates are recorded but cost nothing and do
not count. :func:`finalize` re-times the best few and the default with more runs and makes the
dispatch entry.

Storage (:func:`make_storage`): an Optuna JournalStorage file in ``tuner.runtime.paths.cache_dir()`` by
default, or any Optuna storage URL. Studies are named by GPU key, kernel, bucket, kernel hash and
search-space hash, so a study resumes after an interrupt and starts afresh when the kernel or the
space changes. Several worker processes (one per GPU, or many hosts on one PostgreSQL database) share
a study: each takes trials until the study's budget is reached. A worker that dies leaves RUNNING
trials behind; they are failed and re-queued with their parameters (RDB storage: Optuna heartbeats
and its retry callback; any storage: trials of a dead process on this host), so nothing is lost and
the study still ends with the full count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from tuner.harness.floors import Ceilings
from tuner.runtime.config import Config
from tuner.runtime.device import gpu_info, interpreting
from tuner.runtime.dispatch import untuned_config

from . import transfer
from .finalize import finalize
from .measure import Bench
from .objective import StudyRunner
from .precompile import CompilePool, current_target
from .space import Limits, Space, space_for
from .studies import Heartbeat, counted_trials, heartbeat_storage, open_study, study_name
from .task import Settings, StudyResult, Task


@dataclass
class Context:
    """What a worker process needs to run studies."""

    device: torch.device
    gpu_key: str
    storage: optuna.storages.BaseStorage
    settings: Settings
    limits: Limits
    worker_index: int = 0
    workers: int = 1
    dtype: torch.dtype = torch.bfloat16
    out: Path | None = None
    """The folder of the table this run writes (None: the dispatch folder): seeds are read from it."""
    deadline: float | None = None
    """``time.monotonic()`` by which the whole run should be done (``--minutes``): each study searches for
    an equal share of the time left."""


@dataclass
class Prepared:
    """A task made concrete: its space, default config, study name and a lazily built bench."""

    space: Space
    default: Config
    name: str
    bench: Callable[[], Bench]
    checks: Callable[[], list[Bench]]


def prepare(task: Task, ctx: Context) -> Prepared:
    """The space and study name of ``task`` (the bench, which allocates the inputs, is built on first use)."""
    workload = task.workload()
    holder: list[Bench] = []

    def bench() -> Bench:
        if not holder:
            holder.append(Bench(task.spec, workload, ctx.device, ctx.dtype, seed=ctx.settings.seed))
        return holder[0]

    def checks() -> list[Bench]:
        return [Bench(task.spec, w, ctx.device, ctx.dtype, seed=ctx.settings.seed, gate=False)
                for w in task.check_workloads()]

    default = untuned_config(task.spec, workload.total_q, workload.avg_kv_len, gpu_info(ctx.device))
    space = space_for(task.spec, default)
    return Prepared(space, default, study_name(ctx.gpu_key, task, space, ctx.settings.exhaustive), bench, checks)


def run_tasks(tasks: list[Task], ctx: Context, floors: Ceilings | None = None, finalize_each: bool = True,
              on_counted: Callable[[int], None] = lambda n: None,
              on_result: Callable[[StudyResult], None] = lambda r: None) -> list[StudyResult]:
    """Run the studies of ``tasks`` one after another in this process, finalizing each unless this
    is one of several workers (then the parent finalizes). One compile pool serves all of them."""
    target = None if interpreting() else current_target()
    pool = CompilePool(ctx.settings.compile_workers, target)
    heartbeat = Heartbeat(heartbeat_storage(ctx.storage))
    results: list[StudyResult] = []
    try:
        # One of several workers (the parent finalizes): worker i of n starts at study i * len / n, and
        # a first pass leaves the last trials of a study to whoever holds them; a second pass then waits
        # for any still held (or re-runs those of a worker that died), so that every study completes.
        start = 0 if finalize_each else ctx.worker_index * len(tasks) // max(1, ctx.workers)
        order = tasks[start:] + tasks[:start]
        passes = [(t, False) for t in order] if finalize_each else [(t, p) for p in (True, False) for t in order]
        for i, (task, leave) in enumerate(passes):
            started = time.monotonic()
            prep = prepare(task, ctx)
            study = open_study(prep.name, ctx.storage, ctx.settings, prep.space, prep.default, ctx.worker_index,
                               seeds=seeds_of(task, prep, ctx))
            StudyRunner(task, study, prep.space, prep.bench, pool, ctx.limits, _share(ctx, len(passes) - i),
                        heartbeat, on_counted, leave_to_others=leave).run()
            if finalize_each:
                result = finalize(task, study, prep.space, prep.bench(), ctx.settings, floors, prep.checks())
                result.seconds = time.monotonic() - started
                results.append(result)
                on_result(result)
            del prep
            _release(ctx.device)
    finally:
        heartbeat.close()
        pool.close()
    return results


def _share(ctx: Context, left: int) -> Settings:
    """The settings of the next study: with a deadline, its search time is an equal share of the time left."""
    if ctx.deadline is None:
        return ctx.settings
    return dataclasses.replace(ctx.settings, seconds=max(1.0, (ctx.deadline - time.monotonic()) / max(1, left)))


def seeds_of(task: Task, prep: Prepared, ctx: Context) -> list[tuple[Config, str]]:
    """The configs of the nearest tuned shapes a new study measures after its default (:mod:`.transfer`)."""
    if ctx.settings.exhaustive or ctx.settings.seeds <= 0:
        return []
    gpu = gpu_info(ctx.device)
    return transfer.seed_configs(task, prep.space, prep.default, gpu, ctx.limits,
                                 transfer.seed_tables(gpu, ctx.out), ctx.settings.seeds)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finalize_tasks(tasks: list[Task], ctx: Context, floors: Ceilings | None,
                   on_result: Callable[[StudyResult], None] = lambda r: None) -> list[StudyResult]:
    """Finalize studies that workers ran (the parent process, after the workers are done)."""
    results = []
    for task in tasks:
        prep = prepare(task, ctx)
        study = load_study(prep.name, ctx.storage)
        if study is None:
            continue
        result = finalize(task, study, prep.space, prep.bench(), ctx.settings, floors, prep.checks())
        results.append(result)
        on_result(result)
        del prep
        _release(ctx.device)
    return results


def load_study(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def study_progress(tasks: list[Task], ctx: Context) -> int:
    """Counted trials of all ``tasks`` so far (a parent's progress bar while workers run)."""
    total = 0
    for task in tasks:
        study = load_study(prepare(task, ctx).name, ctx.storage)
        if study is not None:
            total += counted_trials(study.get_trials(deepcopy=False))
    return total
