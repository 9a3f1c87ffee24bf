"""What one study tunes (:class:`Task`), the settings of a tuning run (:class:`Settings`) and what a study
reports (:class:`StudyResult`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from tuner.harness.inputs import Workload
from tuner.runtime.buckets import Bucket
from tuner.runtime.config import Config
from tuner.runtime.dispatch import Entry
from tuner.runtime.spec import MLASpec

from . import representative

COUNTED = frozenset({"ok", "compile_error", "out_of_resources", "incorrect", "launch_error", "timeout"})
"""Trial outcomes that count toward a study's budget (candidates that cost a compile or GPU time)."""

ASKS_PER_TRIAL = 10
"""Proposals a study may make per candidate of its budget (the rest are infeasible or duplicates)."""



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

    Transfer (:mod:`tuner.tuning.transfer`): seeds: how many configs of the nearest tuned shapes and
    buckets a new study measures right after the default (0: none); patience, min_trials, min_gain: a
    study stops once it has measured at least ``min_trials`` candidates and its best has not improved
    by more than ``min_gain`` (a fraction) over the last ``patience`` of them (patience 0: never).
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
    seeds: int = 3
    patience: int = 6
    min_trials: int = 10
    min_gain: float = 0.01


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
    stopped_early: bool = False
    seeds: list[str] = field(default_factory=list)
    """Where the seeds measured after the default came from."""
    seconds: float = math.nan
    """Wall time of the study, search and finalize (nan: not timed here)."""
