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

import concurrent.futures as cf
import hashlib
import json
import math
import os
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from tuner.harness.floors import Ceilings
from tuner.harness.inputs import Workload
from tuner.runtime import paths
from tuner.runtime.buckets import Bucket
from tuner.runtime.config import Config
from tuner.runtime.device import gpu_info
from tuner.runtime.dispatch import Entry, untuned_config, versions
from tuner.runtime.loader import module_hash
from tuner.runtime.spec import MLASpec

from . import representative
from .measure import Bench
from .precompile import CompilePool, CompileResult, capture, current_target, interpreting
from .space import Limits, Space, check_values, feasible_grid, space_for

COUNTED = frozenset({"ok", "compile_error", "out_of_resources", "incorrect", "launch_error", "timeout"})
"""Trial outcomes that count toward a study's budget (candidates that cost a compile or GPU time)."""

ASKS_PER_TRIAL = 10
"""Proposals a study may make per candidate of its budget (the rest are infeasible or duplicates)."""

JOURNAL_NAME = "studies.journal"
JOURNAL_LOCK_GRACE_S = 5


@dataclass(frozen=True)
class Task:
    """One study: a kernel specialization and a bucket, tuned on the bucket's representative batch
    (``tiny``: on a few tokens, for the interpreter's dry run)."""

    spec: MLASpec
    bucket: Bucket
    tiny: bool = False

    @property
    def label(self) -> str:
        return f"{self.spec.name()} {self.bucket.name}"

    def workload(self) -> Workload:
        if self.tiny:
            return representative.tiny_workload(self.bucket, self.spec)
        return representative.workload(self.bucket, self.spec)

    def check_workloads(self) -> tuple[Workload, ...]:
        """The other batches the finalists are re-timed on (none for the interpreter's tiny batch)."""
        return () if self.tiny else representative.check_workloads(self.bucket, self.spec)


@dataclass
class Settings:
    """How to search.

    trials: candidates measured per study (the budget); seconds: wall-clock limit per study (None:
    none). runs / warmup: timed runs per candidate while searching; final_runs: when re-timing the
    finalists (the best ``finalists`` candidates) and the default; margin: how much faster than the
    default (a fraction) a finalist must re-time to replace it, so that a win within the noise of one
    representative batch never displaces the default on the real ones. exhaustive: sweep every feasible
    point instead of sampling. compile_workers: compile processes. heartbeat_s: Optuna heartbeat
    interval for RDB storages (a dead worker's trials are retried after 3 intervals).
    """

    trials: int = 48
    seconds: float | None = None
    runs: int = 20
    warmup: int = 3
    final_runs: int = 100
    finalists: int = 3
    exhaustive: bool = False
    seed: int = 0
    compile_workers: int = 1
    compile_timeout_s: float = 900.0
    heartbeat_s: int = 10
    startup_trials: int = 8
    margin: float = 0.02


@dataclass
class StudyResult:
    """The outcome of one study after :func:`finalize`."""

    task: Task
    study_name: str
    outcomes: Counter[str]
    counted: int
    best: Config | None = None
    best_us: float | None = None
    default: Config | None = None
    default_us: float | None = None
    floor_us: float = math.nan
    entry: Entry | None = None
    best_trial: int | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Storage


def default_journal() -> Path:
    return paths.cache_dir() / JOURNAL_NAME


def make_storage(url: str | None, heartbeat_s: int = 10) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (None: the embedded journal in ``tuner.runtime.paths.cache_dir()``).

    The default is a JournalStorage over a JournalFileBackend, not SQLite: the journal is an
    append-only log of operations, so an interrupted run loses nothing already written and a study
    resumes where it stopped; concurrent worker processes on one host serialize their appends with a
    file lock, where SQLite's database-wide locking makes several writers fail with "database is
    locked"; and it needs no server.

    ``url`` may be ``journal:PATH`` (another journal file), ``redis://...`` (a JournalRedisBackend) or
    any SQLAlchemy URL Optuna accepts (``postgresql://user:pw@host/db``, ``mysql://``, ``sqlite:///``):
    an RDBStorage with heartbeats, so that a killed worker's RUNNING trial is failed after
    3 * ``heartbeat_s`` seconds and re-queued with its parameters (many GPUs and hosts sharing
    studies use PostgreSQL).
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if url is None or url.startswith("journal:"):
        path = default_journal() if url is None else Path(url[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed while appending leaves the lock behind; appends take milliseconds, so a
        # lock older than JOURNAL_LOCK_GRACE_S seconds is stale and broken (Optuna's default waits 30).
        lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    if url.startswith(("redis://", "rediss://")):
        from optuna.storages.journal import JournalRedisBackend

        return JournalStorage(JournalRedisBackend(url))
    import inspect

    url = _with_pg_driver(url)
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    # Optuna 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback.
    arg = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
           in inspect.signature(RDBStorage).parameters else "failed_trial_callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                          **{arg: retry_cls(max_retry=3)})


def _with_pg_driver(url: str) -> str:
    """``postgresql://`` names no driver, and SQLAlchemy 2.1 takes that to mean psycopg 3; use
    psycopg2 (``pip install psycopg2-binary``) when it is the one installed."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _heartbeat_storage(storage: optuna.storages.BaseStorage) -> Any | None:
    """The RDB storage to record heartbeats in, when heartbeats are on."""
    if isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval:
        return storage
    return None


class _Heartbeat:
    """Records a heartbeat for every trial this process holds, every interval (ask/tell has no
    heartbeat thread of its own: Optuna runs one only inside ``study.optimize``)."""

    def __init__(self, storage: Any | None) -> None:
        self.storage = storage
        self.ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if storage is not None:
            self._thread = threading.Thread(target=self._loop, name="mla-tune-heartbeat", daemon=True)
            self._thread.start()

    def add(self, trial_id: int) -> None:
        if self.storage is not None:
            self.storage.record_heartbeat(trial_id)
            with self._lock:
                self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.ids.discard(trial_id)

    def _loop(self) -> None:
        assert self.storage is not None
        while not self._stop.wait(self.storage.heartbeat_interval):
            with self._lock:
                ids = list(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                    pass

    def close(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------------------------------
# Studies


WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def space_hash(space: Space) -> str:
    data = json.dumps([[p.name, list(p.choices)] for p in space.params] + [list(space.fixed)])
    return hashlib.sha256(data.encode()).hexdigest()[:8]


def study_name(gpu_key: str, task: Task, space: Space, exhaustive: bool) -> str:
    """``<gpu>/<kernel>/<bucket>/k<kernel hash>-s<space hash>[/grid]`` (``/tiny`` for dry runs)."""
    name = f"{gpu_key}/{task.spec.name()}/{task.bucket.name}/k{module_hash(task.spec)[:8]}-s{space_hash(space)}"
    return name + ("/tiny" if task.tiny else "") + ("/grid" if exhaustive else "")


def _sampler(settings: Settings, worker_index: int) -> optuna.samplers.BaseSampler:
    if settings.exhaustive:
        return optuna.samplers.RandomSampler(seed=settings.seed + worker_index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed + worker_index, n_startup_trials=min(settings.startup_trials, settings.trials),
            multivariate=True, constant_liar=True)


def open_study(name: str, storage: optuna.storages.BaseStorage, settings: Settings, space: Space,
               default: Config, worker_index: int = 0) -> optuna.Study:
    """Create or load the study; a new study gets the default config as its first trial."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                sampler=_sampler(settings, worker_index), load_if_exists=True)
    if not settings.exhaustive and not study.get_trials(deepcopy=False):
        study.enqueue_trial(space.values_of(default), user_attrs={"default": True}, skip_if_exists=True)
    return study


def _outcome(t: FrozenTrial) -> str | None:
    return t.user_attrs.get("outcome")


def counted_trials(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and _outcome(t) in COUNTED)


def _params_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _requeue(study: optuna.Study, t: FrozenTrial, why: str) -> None:
    """Fail a RUNNING trial that nobody will finish and queue its parameters again."""
    try:
        study.tell(t.number, state=TrialState.FAIL)
    except (RuntimeError, ValueError):
        return  # finished meanwhile, or another worker got there first
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_reason": why})


def recover_lost_trials(study: optuna.Study) -> None:
    """Fail and re-queue RUNNING trials whose worker is gone. With heartbeats (RDB storages): the
    heartbeat-stale ones, re-queued by Optuna's retry callback. Without (journal storages, one host):
    those of processes of this host that no longer exist."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    storage = _heartbeat_storage(_backend(study))
    if storage is not None:
        _seed_heartbeats(storage, running)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    host = socket.gethostname()
    for t in running:
        owner = str(t.user_attrs.get("worker", ""))
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _requeue(study, t, f"worker {owner} died")


_SEEDED: set[tuple[str, int]] = set()


def _seed_heartbeats(storage: Any, running: list[FrozenTrial]) -> None:
    """Record one heartbeat for each of the ``running`` trials this process has not seen before. Optuna never
    fails a RUNNING trial that has no heartbeat at all, which is what a worker killed between
    ``study.ask()`` and its first heartbeat leaves: the other workers would wait for it forever. Seeded
    once, such a trial goes stale one grace period later; a live owner's own beats keep its trial
    fresh (seeding it only refreshes it once)."""
    url = str(getattr(storage, "url", id(storage)))
    for t in running:
        key = (url, t._trial_id)
        if key not in _SEEDED:
            _SEEDED.add(key)
            storage.record_heartbeat(t._trial_id)


def _backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage, unwrapped from the cache Optuna puts around an RDBStorage."""
    inner = getattr(study._storage, "_backend", None)
    return inner if isinstance(inner, optuna.storages.RDBStorage) else study._storage


# ---------------------------------------------------------------------------------------------------
# The pipelined objective


@dataclass
class _Pending:
    """A trial waiting for its compile (and the trials with an identical launch that follow it)."""

    trial: Trial
    config: Config
    key: str
    future: cf.Future[CompileResult]
    submitted: float
    followers: list[Trial] = field(default_factory=list)
    resubmitted: bool = False


class CrashError(RuntimeError):
    """A candidate broke the CUDA context (illegal address, ...): the process cannot go on."""


def _is_crash(err: BaseException) -> bool:
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(err, accel)) or "CUDA error" in str(err)


class StudyRunner:
    """Runs the trials of one study in this process (one worker): ask, prune, compile ahead, measure, tell."""

    def __init__(self, task: Task, study: optuna.Study, space: Space, bench_factory: Callable[[], Bench],
                 pool: CompilePool, limits: Limits, settings: Settings, heartbeat: _Heartbeat,
                 on_counted: Callable[[int], None] = lambda n: None, leave_to_others: bool = False) -> None:
        self.task, self.study, self.space = task, study, space
        self.leave_to_others = leave_to_others  # a worker moves on while others finish the last trials
        self._bench_factory = bench_factory
        self._bench: Bench | None = None
        self.pool, self.limits, self.settings, self.heartbeat = pool, limits, settings, heartbeat
        self.on_counted = on_counted
        self.in_flight: list[_Pending] = []
        self.depth = pool.workers + 2
        self.budget = settings.trials
        self.grid: list[dict[str, int]] | None = feasible_grid(space, limits) if settings.exhaustive else None
        if self.grid is not None:
            self.budget = len(self.grid)
        # Exhaustive bookkeeping, kept incrementally (a sweep has thousands of trials): the points of
        # finished trials, those measured or pruned, and the next grid position to consider.
        self._indexed: set[int] = set()
        self._finished_points: set[tuple[tuple[str, Any], ...]] = set()
        self._done_points: set[tuple[tuple[str, Any], ...]] = set()
        self._grid_pos = 0

    @property
    def bench(self) -> Bench:
        if self._bench is None:
            self._bench = self._bench_factory()
        return self._bench

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _census(self) -> tuple[int, int, int, list[FrozenTrial]]:
        """(trials counted toward the budget, trials running, trials waiting, all trials)."""
        trials = self.study.get_trials(deepcopy=False)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
        if self.grid is None:
            return counted_trials(trials), running, waiting, trials
        for t in trials:
            if t.number not in self._indexed and t.state.is_finished():
                self._indexed.add(t.number)
                self._finished_points.add(_params_key(t.params))
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    self._done_points.add(_params_key(t.params))
        return len(self._done_points), running, waiting, trials

    def _finish(self, trial: Trial, outcome: str, value: float | None = None, reason: str | None = None,
                **attrs: Any) -> None:
        trial.set_user_attr("outcome", outcome)
        if reason is not None:
            trial.set_user_attr("reason", reason[:1000])
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if value is not None:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=TrialState.PRUNED)
        self.heartbeat.discard(trial._trial_id)
        if outcome in COUNTED or self.grid is not None:
            self.on_counted(1)

    def _surplus(self, trial: Trial, trials: list[FrozenTrial]) -> bool:
        """Whether a new trial overshoots the budget: workers that ask at the same moment may together
        create more trials than the budget has left; the later ones (by number) step back."""
        if self.grid is not None or any(t.number == trial.number for t in trials):
            return False  # an exhaustive sweep, or a queued trial (the default, a retry): always run
        now = self.study.get_trials(deepcopy=False)
        ahead = counted_trials(now) + sum(1 for t in now if t.state == TrialState.RUNNING and t.number < trial.number)
        return ahead >= self.budget

    def _ask(self, trials: list[FrozenTrial]) -> Trial:
        if self.grid is not None:
            seen = self._finished_points | {_params_key(t.params) for t in trials if not t.state.is_finished()}
            seen |= {_params_key(p.trial.params) for p in self.in_flight}
            while self._grid_pos < len(self.grid) and _params_key(self.grid[self._grid_pos]) in seen:
                self._grid_pos += 1
            if self._grid_pos < len(self.grid):
                self.study.enqueue_trial(self.grid[self._grid_pos])
                self._grid_pos += 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Heartbeat.*")
            trial = self.study.ask()
        self.heartbeat.add(trial._trial_id)  # first: until it beats, only _seed_heartbeats can recover it
        trial.set_user_attr("worker", WORKER_ID)
        return trial

    # -- one step ------------------------------------------------------------------------------------

    def _propose(self, trials: list[FrozenTrial]) -> None:
        """Ask one trial and either finish it at once (infeasible, duplicate) or start its compile."""
        trial = self._ask(trials)
        if self._surplus(trial, trials):
            self._finish(trial, "surplus", reason="another worker took the last trial of the budget")
            return
        values = {p.name: trial.suggest_categorical(p.name, p.choices) for p in self.space.params}
        config, reason = check_values(self.space, values, self.limits)
        if config is None or reason is not None:
            self._finish(trial, "infeasible", reason=reason)
            return
        key = ",".join(map(str, self.bench.effective_key(config)))
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("effective", key)
        for t in trials:
            if t.user_attrs.get("effective") != key or t.number == trial.number:
                continue
            if t.state == TrialState.COMPLETE and t.value is not None:
                self._finish(trial, "duplicate", t.value, duplicate_of=t.number)
                return
            if t.state in (TrialState.PRUNED, TrialState.FAIL) and _outcome(t) in COUNTED | {"crash"}:
                self._finish(trial, "duplicate", reason=f"same launch as trial {t.number}: {_outcome(t)}",
                             duplicate_of=t.number)
                return
        for pending in self.in_flight:
            if pending.key == key:
                pending.followers.append(trial)
                return
        try:
            job = capture(self.task.spec, self.bench.launcher(config))
        except Exception as err:  # noqa: BLE001 - a config the runtime refuses
            self._finish(trial, "launch_error", reason=f"{type(err).__name__}: {err}")
            return
        self.in_flight.append(_Pending(trial, config, key, self.pool.submit(job), time.monotonic()))

    def _take_ready(self) -> _Pending:
        """Wait for the first candidate whose compile is done (the oldest first)."""
        while True:
            for pending in self.in_flight:
                if pending.future.done() or time.monotonic() - pending.submitted > self.settings.compile_timeout_s:
                    self.in_flight.remove(pending)
                    return pending
            cf.wait([p.future for p in self.in_flight], timeout=1.0, return_when=cf.FIRST_COMPLETED)

    def _compile_result(self, pending: _Pending) -> CompileResult | str:
        if not pending.future.done():
            return "timeout"
        try:
            return pending.future.result()
        except BrokenProcessPool:
            if pending.resubmitted:
                return "compile_error"
            # A worker died (a crash inside the compiler): restart the pool, resubmit everything.
            self.pool.restart()
            for p in [pending, *self.in_flight]:
                job = capture(self.task.spec, self.bench.launcher(p.config))
                p.future, p.submitted, p.resubmitted = self.pool.submit(job), time.monotonic(), True
            return "resubmitted"

    def _measure(self, pending: _Pending) -> None:
        """Gate and time one compiled candidate, then tell it (and its followers)."""
        trial, config = pending.trial, pending.config
        result = self._compile_result(pending)
        if result == "resubmitted":
            self.in_flight.insert(0, pending)
            return
        outcome, value, reason, attrs = "ok", None, None, {}
        if isinstance(result, str):
            outcome, reason = result, f"compile {result} after {self.settings.compile_timeout_s:.0f} s" \
                if result == "timeout" else "the compiler crashed twice"
        elif result.error is not None:
            outcome, reason = "compile_error", result.error
        else:
            attrs = {"compile_s": round(result.seconds, 2), "shared_bytes": result.shared_bytes,
                     "regs": result.regs, "spill_bytes": result.spill_bytes}
            if result.shared_bytes > self.limits.shared_bytes:
                outcome = "out_of_resources"
                reason = f"shared memory {result.shared_bytes} bytes > {self.limits.shared_bytes} allowed"
        if outcome == "ok":
            outcome, value, reason, timing_attrs = self._gate_and_time(trial, config)
            attrs.update(timing_attrs)
        self._finish(trial, outcome, value, reason, **attrs)
        for follower in pending.followers:
            self._finish(follower, "duplicate", value, None if value is not None else reason,
                         duplicate_of=trial.number)

    def _gate_and_time(self, trial: Trial, config: Config) -> tuple[str, float | None, str | None, dict]:
        from triton.runtime.errors import OutOfResources

        try:
            wrong = self.bench.check(config)
            if wrong is not None:
                return "incorrect", None, wrong, {}
            timing = self.bench.time(config, runs=self.settings.runs, warmup=self.settings.warmup)
        except OutOfResources as err:
            return "out_of_resources", None, str(err), {}
        except Exception as err:
            if _is_crash(err):
                trial.set_user_attr("outcome", "crash")
                trial.set_user_attr("reason", f"{type(err).__name__}: {err}"[:1000])
                self.study.tell(trial, state=TrialState.FAIL)
                self.heartbeat.discard(trial._trial_id)
                raise CrashError(f"{self.task.label}: config {config.short()} crashed the GPU context "
                                 f"({err}); it is recorded and will be skipped when the run resumes") from err
            return "launch_error", None, f"{type(err).__name__}: {err}", {}
        return "ok", timing.median_us, None, {"p10_us": round(timing.p10_us, 3), "p90_us": round(timing.p90_us, 3)}

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Take trials until the study's budget is reached (by every worker together) or time is up."""
        deadline = None if self.settings.seconds is None else time.monotonic() + self.settings.seconds
        # Infeasible and already measured proposals cost no compile or GPU time but do cost asks: cap them
        # (H200, 128 heads at page size 64: 4 x 24 + 16 asks measured only 14 of 24 candidates).
        max_asks = ASKS_PER_TRIAL * self.budget + 16 if self.grid is None else 2 * self.budget + 16
        asks_left = max_asks
        idle_since: float | None = None
        self.on_counted(self._census()[0])  # a resumed study has some already
        try:
            while True:
                recover_lost_trials(self.study)
                counted, running, waiting, trials = self._census()
                over = (deadline is not None and time.monotonic() > deadline) or asks_left <= 0
                # Queued trials (the default, retries) are always taken; new ones only within the budget.
                while not over and (waiting or counted + running < self.budget) and len(self.in_flight) < self.depth:
                    self._propose(trials)
                    asks_left -= 1
                    counted, running, waiting, trials = self._census()
                    over = asks_left <= 0
                if self.in_flight:
                    idle_since = None
                    self._measure(self._take_ready())
                    continue
                if counted >= self.budget or over or (self.leave_to_others and running):
                    if asks_left <= 0 and counted < self.budget and self.grid is None:
                        warnings.warn(f"{self.task.label}: stopped after {max_asks} proposals with "
                                      f"{counted} of {self.budget} candidates measured (the sampler kept proposing "
                                      f"infeasible or already measured points)", stacklevel=2)
                    return
                # Other workers hold the remaining trials: wait for them (or for theirs to go stale).
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > max(600.0, 10 * self.settings.heartbeat_s):
                    warnings.warn(f"{self.task.label}: gave up waiting for other workers' trials", stacklevel=2)
                    return
                time.sleep(min(2.0, self.settings.heartbeat_s / 2))
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """On the way out (done, Ctrl-C, crash): fail and re-queue whatever is still in flight."""
        for pending in self.in_flight:
            for trial in (pending.trial, *pending.followers):
                self.heartbeat.discard(trial._trial_id)
                try:
                    self.study.tell(trial, state=TrialState.FAIL)
                except (RuntimeError, ValueError):
                    continue
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                                   "retry_reason": "interrupted"})
        self.in_flight.clear()


# ---------------------------------------------------------------------------------------------------
# Finalizing a study: re-time the best and the default, make the dispatch entry


def finalize(task: Task, study: optuna.Study, space: Space, bench: Bench, settings: Settings,
             floors: Ceilings | None, checks: Sequence[Bench] = ()) -> StudyResult:
    """Re-time the best ``settings.finalists`` distinct candidates and the default with
    ``settings.final_runs`` runs each and make the dispatch entry of the fastest.

    With ``checks`` (the bucket's other batches: its half, and one request where the bucket starts at
    one), a candidate's score is the geometric mean of its times on every batch, and it replaces the
    default only when it is no slower on any: a config that wins only at the representative's exact
    size (H200: a split floor of 1024 tokens, 3% faster on the 48-request representative, 16% slower on
    d-b32-4k) keeps the default. The entry's time stays the representative's."""
    trials = study.get_trials(deepcopy=False)
    outcomes = Counter(_outcome(t) or t.state.name.lower() for t in trials)
    counted = counted_trials(trials) if not settings.exhaustive else sum(
        1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    result = StudyResult(task, study.study_name, outcomes, counted, floor_us=bench.floor_us(floors))
    ok = sorted((t for t in trials if t.state == TrialState.COMPLETE and _outcome(t) == "ok"),
                key=lambda t: t.value if t.value is not None else math.inf)
    finalists: dict[str, tuple[Config, int]] = {}
    for t in ok:
        if len(finalists) >= settings.finalists:
            break
        finalists.setdefault(str(t.user_attrs.get("effective")), (space.to_config(t.params), t.number))
    result.default = default = bench.default_config()

    def score(config: Config, what: str) -> tuple[float, tuple[float, ...]] | None:
        """(score, the times on the representative and on each check batch): the score is the geometric
        mean of the times."""
        times = []
        for b in (bench, *checks):
            us = _retime(b, config, settings, result.notes, what if b is bench else f"{what} ({b.workload.name})")
            if us is None:
                return None
            times.append(us)
        return math.prod(times) ** (1 / len(times)), tuple(times)

    def replaces_default(got: tuple[float, tuple[float, ...]]) -> bool:
        """The margin over the default's score, and no batch slower than with the default."""
        return default_score is None or (got[0] < default_score[0] * (1 - settings.margin) and
                                         all(g <= d for g, d in zip(got[1], default_score[1], strict=True)))

    wrong = _safe_check(bench, default)
    default_score = None
    if wrong is None:
        default_score = score(default, "the default config")
        result.default_us = None if default_score is None else default_score[1][0]
    else:
        result.notes.append(f"the default config fails the correctness gate: {wrong}")
    best: tuple[float, tuple[float, ...], Config, int | None] | None = None
    if default_score is not None:
        best = (*default_score, default, next((t.number for t in ok if t.user_attrs.get("default")), None))
    for config, number in finalists.values():
        got = None if config == default else score(config, f"trial {number}")
        if got is not None and replaces_default(got) and (best is None or got[0] < best[0]):
            best = (*got, config, number)
    if best is None:
        result.notes.append("no candidate passed the correctness gate: no entry")
        return result
    _, times, result.best, result.best_trial = best
    result.best_us = times[0]
    result.entry = Entry(config=result.best, time_us=result.best_us, default_time_us=result.default_us,
                         kernel_hash=module_hash(task.spec), trials=counted, versions=versions())
    return result


def _retime(bench: Bench, config: Config, settings: Settings, notes: list[str], what: str) -> float | None:
    try:
        return bench.time(config, runs=settings.final_runs, warmup=settings.warmup).median_us
    except Exception as err:  # noqa: BLE001 - a candidate that will not re-time is dropped, and said
        notes.append(f"{what} failed to re-time: {type(err).__name__}: {err}")
        return None


def _safe_check(bench: Bench, config: Config) -> str | None:
    try:
        return bench.check(config)
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return f"{type(err).__name__}: {err}"


def tpe_vs_grid(study: optuna.Study, grid_best_us: float, within: float = 0.03) -> dict[str, Any] | None:
    """How the TPE study of the same bucket fared against the exhaustive optimum: its best, its
    measured-candidate count, and how many candidates it took to get within ``within`` of the optimum."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    measured = 0
    reached_at = None
    best = math.inf
    for t in trials:
        if _outcome(t) not in COUNTED:
            continue
        measured += 1
        if t.state == TrialState.COMPLETE and t.value is not None and _outcome(t) == "ok":
            best = min(best, t.value)
            if reached_at is None and best <= grid_best_us * (1 + within):
                reached_at = measured
    if measured == 0:
        return None
    return {"tpe_best_us": best, "tpe_measured": measured, "within": within, "reached_at": reached_at}


# ---------------------------------------------------------------------------------------------------
# Running studies in this process


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
    heartbeat = _Heartbeat(_heartbeat_storage(ctx.storage))
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
