"""Optuna storage and studies: the journal file or database, heartbeats, study names, and the recovery of
trials that a dead worker left RUNNING (failed and re-queued with their parameters)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.runtime import paths
from tuner.runtime.config import Config
from tuner.runtime.loader import module_hash

from .space import Space
from .task import COUNTED, Settings, Task

JOURNAL_NAME = "studies.journal"
JOURNAL_LOCK_GRACE_S = 5




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


def heartbeat_storage(storage: optuna.storages.BaseStorage) -> Any | None:
    """The RDB storage to record heartbeats in, when heartbeats are on."""
    if isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval:
        return storage
    return None


class Heartbeat:
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
               default: Config, worker_index: int = 0, seeds: Sequence[tuple[Config, str]] = ()) -> optuna.Study:
    """Create or load the study. A new study gets the default config as its first trial, then ``seeds``
    ((config, where it came from), :func:`tuner.tuning.transfer.seed_configs`). Only the worker that
    creates the study queues them (the storage lets one creation succeed, journal and RDB alike), so
    workers joining a study never queue them twice, not even at the same moment (a worker that finds the
    study empty may be looking between its creation and the queueing). A creator that dies in between
    leaves a study without them: TPE alone, and the default still re-timed by finalize."""
    sampler = _sampler(settings, worker_index)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    if settings.exhaustive or not created:
        return study
    study.enqueue_trial(space.values_of(default), user_attrs={"default": True}, skip_if_exists=True)
    for config, source in seeds:
        study.enqueue_trial(space.values_of(config), user_attrs={"seed": source}, skip_if_exists=True)
    if seeds:
        study.set_user_attr("seeds", [source for _, source in seeds])
    return study


def outcome(t: FrozenTrial) -> str | None:
    return t.user_attrs.get("outcome")


def counted_trials(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and outcome(t) in COUNTED)


def params_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
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
    storage = heartbeat_storage(_backend(study))
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
