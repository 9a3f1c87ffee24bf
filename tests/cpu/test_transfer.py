"""Transfer tuning (tuner.tuning.transfer): seeds from the nearest tuned shapes, queued once per study (also
with two workers on one journal), the order of the studies, the early stop, the per-study progress and the
command line. The measurement is faked (no kernel runs): the runner's compile pool and bench are stubs."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")

from helpers import own_generated_dir, tuned_entry  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from tuner.runtime import dispatch  # noqa: E402
from tuner.runtime.buckets import DECODE_BUCKETS, by_name  # noqa: E402
from tuner.runtime.config import DecodeConfig  # noqa: E402
from tuner.runtime.device import GPUInfo  # noqa: E402
from tuner.runtime.spec import MLASpec  # noqa: E402
from tuner.tuning import objective, progress, representative, search, studies, transfer  # noqa: E402
from tuner.tuning.precompile import CompileResult  # noqa: E402
from tuner.tuning.space import Limits, check, space_for  # noqa: E402
from tuner.tuning.task import Settings, StudyResult, Task  # noqa: E402

H200 = GPUInfo(key="nvidia-h200", name="NVIDIA H200", capability="9.0", num_sms=132)
TARGET = MLASpec("decode", 32, 512, 64, 16)
BUCKET = by_name("decode", "b17-96_kv2k+")


@pytest.fixture(autouse=True)
def generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield own_generated_dir(tmp_path, monkeypatch)
    dispatch.reload()


entry = tuned_entry


def prepared(spec: MLASpec = TARGET, bucket=BUCKET):  # -> (task, space, default)
    task = Task(spec, bucket)
    w = representative.workload(bucket, spec)
    default = dispatch.untuned_config(spec, w.total_q, w.avg_kv_len, H200)
    return task, space_for(spec, default), default


def table_with_neighbours() -> None:
    h16, h128 = MLASpec("decode", 16, 512, 64, 64), MLASpec("decode", 128, 512, 64, 64)
    ws16 = DecodeConfig(block_h=16, block_n=64, num_stages=2, tma=1, ws=1, pdl=1, merge_block_h=4, align=1)
    triton16 = DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=3, tma=1, merge_block_h=4, align=1,
                            split_tokens=256, programs_per_sm=2)
    own_old = DecodeConfig(block_h=32, block_n=64, num_stages=2, ws=1, pdl=1, merge_block_h=8, align=1,
                           split_tokens=1024)
    dispatch.merge(H200, {(h16.name(), BUCKET.name): entry(replace(ws16, split_tokens=512), h16),
                          (h16.name(), "b17-96_kv1-2k"): entry(triton16, h16),
                          (h128.name(), BUCKET.name): entry(replace(ws16, block_h=64, merge_block_h=8), h128),
                          (TARGET.name(), BUCKET.name): entry(own_old, TARGET, kernel_hash="0" * 16)})


# -- seeds -------------------------------------------------------------------------------------------------


def test_seeds_are_distinct_legal_points_of_the_space_nearest_first(generated: Path) -> None:
    table_with_neighbours()
    task, space, default = prepared()
    tables = transfer.seed_tables(H200, None)
    assert [t.gpu.key for t in tables] == [H200.key]  # the table written and the runtime's are one file here
    seeds = transfer.seed_configs(task, space, default, H200, Limits(), tables, 5)
    assert 2 <= len(seeds) <= 4
    keys = {studies.params_key(space.values_of(default))}
    for config, _ in seeds:
        assert space.contains(config) and check(TARGET, config) is None
        keys.add(studies.params_key(space.values_of(config)))
    assert len(keys) == len(seeds) + 1  # distinct, and none is the default
    (first, first_from), (second, second_from) = seeds[:2]
    assert "tuned for an older kernel" in first_from and first.split_tokens == 1024  # its own stale entry
    assert second_from == f"mla_paged_decode_h16_ckv512_kpe64_ps64 {BUCKET.name}" and second.split_tokens == 512
    assert second.block_h == 32 and second.tma == 0  # adapted: 32 heads, a 64-token tile spans 16-token pages
    assert transfer.seed_configs(task, space, default, H200, Limits(), tables, 1) == seeds[:1]
    assert transfer.seed_configs(task, space, default, H200, Limits(), tables, 0) == []
    assert transfer.seed_configs(task, space, default, H200, Limits(), [], 3) == []


def _open(path: Path, name: str, seeds, settings: Settings | None = None) -> optuna.Study:
    task, space, default = prepared()
    return studies.open_study(name, studies.make_storage(f"journal:{path}"), settings or Settings(), space, default,
                              seeds=seeds)


def test_seeds_are_queued_once_by_the_worker_that_creates_the_study(tmp_path: Path) -> None:
    table_with_neighbours()
    task, space, default = prepared()
    seeds = transfer.seed_configs(task, space, default, H200, Limits(), transfer.seed_tables(H200, None), 3)
    journal = tmp_path / "studies.journal"
    first = _open(journal, "s", seeds)
    waiting = first.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 + len(seeds) and waiting[0].user_attrs == {"default": True}
    assert [t.user_attrs["seed"] for t in waiting[1:]] == [s for _, s in seeds] == first.user_attrs["seeds"]
    second = _open(journal, "s", seeds)  # a second worker (its own storage object) joins: nothing queued again
    assert len(second.get_trials()) == 1 + len(seeds)

    # Two workers opening new studies at the same moment: one creates and seeds each, never both.
    def worker(name: str, barrier: threading.Barrier, opened: list[optuna.Study]) -> None:
        barrier.wait()
        opened.append(_open(journal, name, seeds))

    for k in range(4):
        barrier = threading.Barrier(2)
        opened: list[optuna.Study] = []
        threads = [threading.Thread(target=worker, args=(f"race{k}", barrier, opened)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(opened) == 2
        trials = _open(journal, f"race{k}", seeds).get_trials()
        assert len(trials) == 1 + len(seeds), [t.user_attrs for t in trials]


# -- the runner: seeds measured first, the early stop ------------------------------------------------------


class _Bench:
    """Times a config by a rule instead of running it."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.timed: list[DecodeConfig] = []

    def effective_key(self, config):
        return tuple(config.to_dict().values())

    def launcher(self, config):
        return lambda: None

    def check(self, config):
        return None

    def time(self, config, runs: int, warmup: int = 3):
        self.timed.append(config)
        us = self.rule(config)
        return SimpleNamespace(median_us=us, p10_us=us, p90_us=us)


class _Pool:
    workers = 2

    def submit(self, job) -> Future:
        done: Future = Future()
        done.set_result(CompileResult(shared_bytes=1024, kernels=2))
        return done


def _run(study: optuna.Study, rule, settings: Settings) -> _Bench:
    task, space, _ = prepared()
    bench = _Bench(rule)
    objective.StudyRunner(task, study, space, lambda: bench, _Pool(), Limits(), settings,
                          studies.Heartbeat(None)).run()
    return bench


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objective, "capture", lambda spec, launch: None)


def test_a_study_measures_its_seeds_then_stops_when_nothing_gains(tmp_path: Path, no_compile: None) -> None:
    table_with_neighbours()
    task, space, default = prepared()
    seeds = transfer.seed_configs(task, space, default, H200, Limits(), transfer.seed_tables(H200, None), 3)
    best = seeds[1][0]
    settings = Settings(trials=40, patience=4, min_trials=6, runs=1, startup_trials=4)
    journal = tmp_path / "studies.journal"
    study = _open(journal, "s", seeds, settings)
    bench = _run(study, lambda c: 50.0 if c == best else 100.0 + c.split_tokens / 1000, settings)
    assert bench.timed[0] == default and bench.timed[1:1 + len(seeds)] == [c for c, _ in seeds]
    trials = study.get_trials()
    assert studies.counted_trials(trials) == 7  # the seed measured third gained: stopped 4 (patience) later
    assert study.user_attrs["stopped_early"]["last_gain"] == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dropped = [t for t in trials if t.user_attrs.get("outcome") == "stopped"]  # in flight at the stop: not measured
    assert dropped and all(t.state == TrialState.PRUNED for t in dropped)
    # Another worker, or the same command run again: the study has stopped, nothing more is measured.
    again = _open(journal, "s", seeds, settings)
    assert _run(again, lambda c: 1.0, settings).timed == [] and studies.counted_trials(again.get_trials()) == 7


def test_gains_push_the_stop_back_and_patience_zero_runs_the_whole_budget(tmp_path: Path, no_compile: None) -> None:
    settings = Settings(trials=14, patience=3, min_trials=4, runs=1, startup_trials=2, seeds=0)
    study = _open(tmp_path / "a.journal", "s", [], settings)
    clock = iter(range(1000, 0, -50))  # every candidate 5% or more faster than the one before
    _run(study, lambda c: float(next(clock)), settings)
    assert studies.counted_trials(study.get_trials()) == 14 and "stopped_early" not in study.user_attrs
    study = _open(tmp_path / "b.journal", "s", [], replace(settings, patience=0))
    _run(study, lambda c: 100.0, replace(settings, patience=0))
    assert studies.counted_trials(study.get_trials()) == 14


def test_the_rule_counts_measured_candidates_only() -> None:
    stop = transfer.EarlyStop(patience=3, min_trials=4, min_gain=0.01)
    dists = {"x": optuna.distributions.CategoricalDistribution((0, 1))}

    def trial(number: int, value: float | None, outcome: str = "ok"):
        state = TrialState.COMPLETE if value is not None else TrialState.PRUNED
        return optuna.trial.create_trial(params={"x": 0}, distributions=dists, value=value, state=state,
                                         user_attrs={"outcome": outcome}) if state == TrialState.COMPLETE else \
            optuna.trial.create_trial(params={"x": 0}, distributions=dists, state=state,
                                      user_attrs={"outcome": outcome})

    trials = [trial(0, 100.0), trial(1, None, "infeasible"), trial(2, 99.5), trial(3, 90.0),
              trial(4, None, "compile_error"), trial(5, 89.5, "duplicate"), trial(6, 89.8)]
    for i, t in enumerate(trials):
        t.number = i
    assert stop.progress(trials) == (5, 3, 89.8)  # 99.5 gained < 1%; 90 did; the duplicate is not counted
    assert stop.stop_at(trials) == 6
    assert stop.stop_at(trials[:1]) == 4


# -- order, progress, command line ---------------------------------------------------------------------------


def test_order_starts_at_the_anchors_and_goes_outwards() -> None:
    from tuner.cli import build_parser
    from tuner.tuning.command import build_tasks

    tasks = build_tasks(build_parser().parse_args(["tune", "--catalogue"]), dry=False)
    assert len(tasks) == 22 * 6 + 22 * 4  # every decode and causal prefill module, every bucket
    shapes = list(dict.fromkeys((t.spec.num_heads, t.spec.page_size) for t in tasks))
    assert shapes[:4] == [(16, 64), (16, 1), (16, 32), (16, 16)]
    assert [h for h, _ in shapes][::4] == [16, 8, 32, 64, 128]
    assert [t.bucket for t in tasks[:6]] == list(DECODE_BUCKETS) and tasks[0].spec.page_size == 64
    one = build_tasks(build_parser().parse_args(["tune", "--heads", "64", "--page-size", "16"]), dry=False)
    assert {t.spec.name() for t in one} == {"mla_paged_decode_h64_ckv512_kpe64_ps16",
                                            "mla_paged_prefill_causal_h64_ckv512_kpe64_ps16"} and len(one) == 10
    narrowed = build_tasks(build_parser().parse_args(["tune", "--catalogue", "--heads", "8", "--variant", "decode"]),
                           dry=False)
    assert len(narrowed) == 4 * 6


def test_progress_line_says_how_far_what_and_how_long() -> None:
    now = [0.0]
    lines: list[str] = []
    p = progress.Progress(4, lines.append, clock=lambda: now[0])
    task, _, default = prepared()
    done = StudyResult(task, "s", {}, 12, best=default, best_us=90.0, default_us=99.0,
                       entry=entry(default, TARGET), stopped_early=True, seeds=["a", "b"], seconds=4.2)
    now[0] = 5.0
    p(done)
    assert lines[-1] == (f"[1/4] {task.label}: 90.0 us, 1.10x the default, 12 trials (stopped early), 2 seeds, "
                         "4.2 s; about 15 s left")
    now[0] = 600.0
    p(replace(done, stopped_early=False, seeds=[]))
    assert lines[-1].endswith("12 trials, 4.2 s; about 10 min left")
    p(replace(done, entry=None, best_us=None, notes=["no candidate passed"]))
    p(done)
    assert lines[-2] == f"[3/4] {task.label}: no entry (no candidate passed)" and lines[-1].endswith("; done")


def test_settings_and_deadline_from_the_command_line() -> None:
    import time

    import torch

    from tuner.cli import build_parser
    from tuner.tuning.command import build_settings

    s = build_settings(build_parser().parse_args(["tune", "--patience", "0", "--min-trials", "3", "--seeds", "1"]),
                       dry=False, n_tasks=5)
    assert (s.patience, s.min_trials, s.seeds) == (0, 3, 1)
    with pytest.raises(SystemExit, match="at least 0"):
        build_settings(build_parser().parse_args(["tune", "--seeds", "-1"]), dry=False, n_tasks=5)
    ctx = search.Context(device=torch.device("cpu"), gpu_key="k", storage=None, settings=Settings(seconds=5.0),
                         limits=Limits(), deadline=time.monotonic() + 100)
    assert 45 < search._share(ctx, 2).seconds <= 50  # an equal share of the time left, not the first split
    assert search._share(replace(ctx, deadline=None), 2).seconds == 5.0
