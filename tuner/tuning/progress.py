"""What ``mla-tune tune`` prints as each study finishes: how far the run is, what the study found, and an
estimate of the time left."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .task import StudyResult


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """One line per finished study: ``[done/total]``, the kernel and bucket, the best time and its speedup
    over the default, the candidates measured (and whether the study stopped early), its seeds, the
    study's wall time, and the time left (the mean time per study so far, times the studies left)."""

    def __init__(self, total: int, write: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.write, self.clock = total, write, clock
        self.done = 0
        self.started = clock()

    def left_s(self) -> float:
        if self.done == 0:
            return math.nan
        return (self.clock() - self.started) / self.done * max(0, self.total - self.done)

    def line(self, result: StudyResult) -> str:
        head = f"[{self.done}/{self.total}] {result.task.label}: "
        if result.entry is None or result.best_us is None:
            return head + f"no entry ({'; '.join(result.notes)})"
        speedup = "" if result.default_us is None else f", {result.default_us / result.best_us:.2f}x the default"
        trials = f"{result.counted} trials" + (" (stopped early)" if result.stopped_early else "")
        seeds = f", {len(result.seeds)} seed{'s' * (len(result.seeds) > 1)}" if result.seeds else ""
        took = "" if math.isnan(result.seconds) else f", {result.seconds:.1f} s"
        left = f"; about {_duration(self.left_s())} left" if self.done < self.total else "; done"
        return head + f"{result.best_us:.1f} us{speedup}, {trials}{seeds}{took}{left}"

    def __call__(self, result: StudyResult) -> None:
        self.done += 1
        self.write(self.line(result))
