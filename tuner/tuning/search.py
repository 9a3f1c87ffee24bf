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

from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from tuner.harness.floors import Ceilings
from tuner.runtime.config import Config
from tuner.runtime.device import gpu_info, interpreting
from tuner.runtime.dispatch import untuned_config

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
        return [Bench(task.spec, w, ctx.device, ctx.dtype, seed=ctx.settings.seed) for w in task.check_workloads()]

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
        for task, leave in passes:
            prep = prepare(task, ctx)
            study = open_study(prep.name, ctx.storage, ctx.settings, prep.space, prep.default, ctx.worker_index)
            StudyRunner(task, study, prep.space, prep.bench, pool, ctx.limits, ctx.settings, heartbeat,
                        on_counted, leave_to_others=leave).run()
            if finalize_each:
                result = finalize(task, study, prep.space, prep.bench(), ctx.settings, floors, prep.checks())
                results.append(result)
                on_result(result)
            del prep
            _release(ctx.device)
    finally:
        heartbeat.close()
        pool.close()
    return results


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
