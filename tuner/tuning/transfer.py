"""Transfer tuning: seed each study with the winners of the nearest tuned shapes, tune in an order that makes
such winners available, and stop a study once its best stops improving.

- **Seeds** (:func:`seed_configs`): the bucket's own entry (even one tuned for an older kernel: a re-tune
  after a template change starts from the old winner), then the entries of the nearest shapes and buckets
  (:func:`tuner.runtime.derive.neighbours`, fresh kernel hashes only), each adapted to the study's spec as
  the runtime adapts them (:func:`tuner.runtime.derive.adapt`) and kept only if it is a feasible point of
  the study's space. They are read from the table the run writes (each finished study is merged into it at
  once, so later studies see earlier ones) and the tables the runtime reads on this GPU. A new study
  measures them right after the default (:func:`tuner.tuning.studies.open_study` queues them).
- **Order** (:func:`order_tasks`): head counts and page sizes from the anchors outwards (16 heads; page
  sizes 64 and 1), so that each shape comes after a nearer one.
- **Early stop** (:class:`EarlyStop`): a study stops once it has measured ``min_trials`` candidates and
  the last ``patience`` of them improved its best by no more than ``min_gain``. The rule is a function of
  the study's trials in the storage, so every worker of a shared study agrees, and a resumed run stops
  where the first one did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.runtime import derive, dispatch
from tuner.runtime.config import Config
from tuner.runtime.device import GPUInfo
from tuner.runtime.spec import MLASpec

from .space import Limits, Space, check
from .studies import outcome, params_key
from .task import COUNTED, Settings, Task

ANCHOR_HEADS = (16,)
ANCHOR_PAGE_SIZES = (64, 1)
"""Where the order starts: the shapes the committed table has tuned first (DeepSeek-V3 at TP 8)."""


def seed_tables(gpu: GPUInfo, out: Path | None) -> list[dispatch.Table]:
    """The tables seeds come from: the one this run writes (``out``: its folder; None: the dispatch
    folder), read afresh, then those the runtime reads on ``gpu`` (this GPU's, then the same capability's)."""
    path = dispatch.table_path(gpu.key, out)
    tables = []
    if path.is_file():
        try:
            tables.append(dispatch.load_table(path))
        except dispatch.DispatchTableError:
            pass  # the export reports it
    return tables + [t for t in dispatch.tables_for(gpu) if t.path is None or t.path.resolve() != path.resolve()]


def _into_space(space: Space, config: Config) -> Config | None:
    """``config`` with the space's fixed fields, or None if it is not a point of ``space``."""
    try:
        fixed = type(config).from_dict({**config.to_dict(), **dict(space.fixed)})
    except ValueError:
        return None
    return fixed if space.contains(fixed) else None


def seed_configs(task: Task, space: Space, default: Config, gpu: GPUInfo, limits: Limits,
                 tables: Sequence[dispatch.Table], count: int) -> list[tuple[Config, str]]:
    """Up to ``count`` (config, where it came from) to measure after ``default``: distinct feasible points
    of ``space`` adapted from the bucket's own entry and the nearest tuned shapes (module docstring)."""
    if count <= 0:
        return []
    spec, bucket = task.spec, task.bucket
    candidates: list[tuple[Config, MLASpec, str]] = []
    own = next(((t, e) for t in tables if (e := t.entry(spec.name(), bucket.name)) is not None), None)
    if own is not None:
        table, entry = own
        old = "" if derive.fresh(spec, entry) else ", tuned for an older kernel"
        candidates.append((entry.config, spec, f"its entry on {table.gpu.key}{old}"))
    for table in tables:
        candidates += [(e.config, other, f"{other.name()} {b.name}")
                       for other, b, e in derive.neighbours(spec, bucket, table.kernels) if derive.fresh(other, e)]
    target = replace(gpu, shared_bytes=limits.shared_bytes)
    seen = {params_key(space.values_of(default))}
    chosen: list[tuple[Config, str]] = []
    for config, source, what in candidates:
        adapted = derive.adapt(config, source, spec, bucket, target)
        adapted = None if adapted is None else _into_space(space, adapted)
        if adapted is None or check(spec, adapted, limits) is not None:
            continue
        key = params_key(space.values_of(adapted))
        if key not in seen:
            seen.add(key)
            chosen.append((adapted, what))
            if len(chosen) == count:
                break
    return chosen


def _outwards(values: Iterable[int], anchors: Sequence[int]) -> dict[int, int]:
    """Rank of each value: the anchors present first, then repeatedly the value nearest (by ratio) to
    those already ranked (ties: the smaller)."""
    left = sorted(set(values))
    ranked = [a for a in anchors if a in left] or left[:1]
    left = [v for v in left if v not in ranked]
    while left:
        nearest = min(left, key=lambda v: (min(abs(math.log2(v / r)) for r in ranked), v))
        ranked.append(nearest)
        left.remove(nearest)
    return {v: i for i, v in enumerate(ranked)}


def order_tasks(tasks: Sequence[Task]) -> list[Task]:
    """``tasks`` in an order that tunes every shape after a nearer one (module docstring); buckets of a
    kernel stay in their order."""
    heads = _outwards((t.spec.num_heads for t in tasks), ANCHOR_HEADS)
    pages = _outwards((t.spec.page_size for t in tasks), ANCHOR_PAGE_SIZES)
    position = {t: i for i, t in enumerate(tasks)}
    return sorted(tasks, key=lambda t: (heads[t.spec.num_heads], pages[t.spec.page_size], t.spec.head_dim_ckv != 512,
                                        t.spec.variant, position[t]))


class EarlyStop:
    """Stops a study whose best has not improved by more than ``min_gain`` over its last ``patience``
    measured candidates (once it has ``min_trials``). Call it as an Optuna callback,
    ``stopper(study, trial)``: it records ``stopped_early`` in the study's user attributes when the rule
    holds; :meth:`stop_at` is the rule itself."""

    def __init__(self, patience: int, min_trials: int, min_gain: float) -> None:
        self.patience, self.min_trials, self.min_gain = patience, min_trials, min_gain

    @classmethod
    def of(cls, settings: Settings) -> EarlyStop | None:
        if settings.patience <= 0 or settings.exhaustive:
            return None
        return cls(settings.patience, settings.min_trials, settings.min_gain)

    def progress(self, trials: Sequence[FrozenTrial]) -> tuple[int, int, float]:
        """(candidates measured, how many of them up to the last gain of more than min_gain, the best)."""
        measured = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                           and outcome(t) in COUNTED), key=lambda t: t.number)
        best, last_gain = math.inf, 0
        for i, t in enumerate(measured, 1):
            if t.state == TrialState.COMPLETE and t.value is not None and outcome(t) == "ok":
                if t.value < best * (1 - self.min_gain):
                    last_gain = i
                best = min(best, t.value)
        return len(measured), last_gain, best

    def stop_at(self, trials: Sequence[FrozenTrial]) -> int:
        """The measured count at which the study stops unless a candidate gains more than min_gain first."""
        _, last_gain, _ = self.progress(trials)
        return max(self.min_trials, last_gain + self.patience)

    def __call__(self, study: Any, trial: FrozenTrial | None = None) -> bool:
        """Whether the study is done; records why the first time."""
        trials = study.get_trials(deepcopy=False)
        measured, last_gain, best = self.progress(trials)
        if measured < max(self.min_trials, last_gain + self.patience):
            return False
        if "stopped_early" not in study.user_attrs:
            study.set_user_attr("stopped_early", {"measured": measured, "last_gain": last_gain, "best_us": best,
                                                  "patience": self.patience, "min_gain": self.min_gain})
        return True
