"""The pipelined objective of one study (:class:`StudyRunner`), in Optuna's ask/tell form: the GPU measures
earlier candidates while the compile pool builds the next ones."""

from __future__ import annotations

import concurrent.futures as cf
import time
import warnings
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from tuner.runtime.config import Config

from .measure import Bench
from .precompile import CompilePool, CompileResult, capture
from .space import Limits, Space, check_values, feasible_grid
from .studies import WORKER_ID, Heartbeat, counted_trials, outcome, params_key, recover_lost_trials
from .task import ASKS_PER_TRIAL, COUNTED, Settings, Task
from .transfer import EarlyStop


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
                 pool: CompilePool, limits: Limits, settings: Settings, heartbeat: Heartbeat,
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
        self.stopper = EarlyStop.of(settings)
        self.ahead = max(2, self.depth // 4)  # proposals beyond the early stop's horizon: compiles in flight
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
                self._finished_points.add(params_key(t.params))
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    self._done_points.add(params_key(t.params))
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
            seen = self._finished_points | {params_key(t.params) for t in trials if not t.state.is_finished()}
            seen |= {params_key(p.trial.params) for p in self.in_flight}
            while self._grid_pos < len(self.grid) and params_key(self.grid[self._grid_pos]) in seen:
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
            if t.state in (TrialState.PRUNED, TrialState.FAIL) and outcome(t) in COUNTED | {"crash"}:
                self._finish(trial, "duplicate", reason=f"same launch as trial {t.number}: {outcome(t)}",
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
                if self.stopper is not None and not waiting and self.stopper(self.study):
                    self._drop_in_flight()  # queued trials (the default, the seeds) are measured first
                    return
                over = (deadline is not None and time.monotonic() > deadline) or asks_left <= 0
                # Queued trials (the default, retries) are always taken; new ones only within the budget (and
                # not far beyond where the study stops early unless a candidate gains).
                while not over and (waiting or counted + running < self._limit(trials)) and \
                        len(self.in_flight) < self.depth:
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

    def _limit(self, trials: list[FrozenTrial]) -> int:
        if self.stopper is None:
            return self.budget
        return min(self.budget, self.stopper.stop_at(trials) + self.ahead)

    def _drop_in_flight(self) -> None:
        """The study stopped early: what is still compiling is not measured (nor queued again)."""
        for pending in self.in_flight:
            pending.future.cancel()
            for trial in (pending.trial, *pending.followers):
                try:
                    self._finish(trial, "stopped", reason="the study stopped early")
                except (RuntimeError, ValueError):
                    self.heartbeat.discard(trial._trial_id)
        self.in_flight.clear()

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
