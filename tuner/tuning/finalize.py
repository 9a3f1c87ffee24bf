"""Finalizing a study: the best few and the default re-timed with more runs on the representative batch and
its check batches, and the dispatch entry made from the winner."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.harness.floors import Ceilings
from tuner.runtime.config import Config
from tuner.runtime.dispatch import Entry, versions
from tuner.runtime.loader import module_hash

from .measure import Bench
from .space import Space
from .studies import counted_trials, outcome
from .task import COUNTED, Settings, StudyResult, Task


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
    outcomes = Counter(outcome(t) or t.state.name.lower() for t in trials)
    counted = counted_trials(trials) if not settings.exhaustive else sum(
        1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    attrs = study.user_attrs
    result = StudyResult(task, study.study_name, outcomes, counted, floor_us=bench.floor_us(floors),
                         stopped_early="stopped_early" in attrs, seeds=list(attrs.get("seeds", [])))
    ok = sorted((t for t in trials if t.state == TrialState.COMPLETE and outcome(t) == "ok"),
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
        if outcome(t) not in COUNTED:
            continue
        measured += 1
        if t.state == TrialState.COMPLETE and t.value is not None and outcome(t) == "ok":
            best = min(best, t.value)
            if reached_at is None and best <= grid_best_us * (1 + within):
                reached_at = measured
    if measured == 0:
        return None
    return {"tpe_best_us": best, "tpe_measured": measured, "within": within, "reached_at": reached_at}
