"""Two tuner workers share one study on a real PostgreSQL server (Triton interpreter, tiny problem):
both contribute trials, and a worker killed with SIGKILL mid-study loses nothing: Optuna's heartbeat
fails its RUNNING trials, the retry callback re-queues them, the surviving worker runs them, and the
study ends with exactly the budgeted number of measured candidates.

Needs ``MLA_TUNER_TEST_PG_URL`` (for example ``postgresql://postgres@127.0.0.1:5432/mla``) and
psycopg2; skipped otherwise (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from tuner.tuning.studies import _with_pg_driver, counted_trials  # noqa: E402
from tuner.tuning.task import COUNTED  # noqa: E402

pytestmark = pytest.mark.postgres

REPO_ROOT = Path(__file__).resolve().parents[2]
TRIALS = 8


def _worker(index: int, url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tuner", "tune", "--dry-run", "--storage", url, "--worker-index", str(index),
            "--variant", "decode", "--page-size", "1", "--trials", str(TRIALS), "--heartbeat", "1"]
    # A session of its own, so that killing the worker also kills its compile process (a lost machine).
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _study(url: str, gpu_key: str):
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name.startswith(gpu_key + "/")]
    return optuna.load_study(study_name=names[0], storage=url) if names else None


def _pid(trial) -> int | None:
    worker = str(trial.user_attrs.get("worker", ""))
    return int(worker.rpartition(":")[2]) if worker else None


def test_two_workers_share_a_study_and_a_killed_worker_loses_nothing(tmp_path: Path) -> None:
    url = _with_pg_driver(os.environ["MLA_TUNER_TEST_PG_URL"])
    gpu_key = f"test-pg-{uuid.uuid4().hex[:8]}"  # a study of its own on a shared server
    env = {**os.environ, "TRITON_INTERPRET": "1", "MLA_TUNER_GPU_KEY": gpu_key,
           "MLA_TUNER_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    survivor, victim = (_worker(i, url, env, logs[i]) for i in range(2))
    try:
        # Kill the victim once it has finished a trial and holds another one.
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the victim never got going:\n" + logs[1].read_text()[-3000:]
            assert victim.poll() is None, "the victim finished before it could be killed"
            study = _study(url, gpu_key)
            trials = study.get_trials(deepcopy=False) if study is not None else []
            mine = [t for t in trials if _pid(t) == victim.pid]
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in mine) and \
                    any(t.state == optuna.trial.TrialState.RUNNING for t in mine):
                break
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert survivor.wait(timeout=300) == 0, logs[0].read_text()[-3000:]
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    study = _study(url, gpu_key)
    trials = study.get_trials(deepcopy=False)
    State = optuna.trial.TrialState
    counted = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED) and t.user_attrs["outcome"] in COUNTED]
    outline = [(t.number, t.state.name, t.user_attrs.get("outcome")) for t in trials]
    assert len(counted) == counted_trials(trials) == TRIALS, outline
    assert {survivor.pid, victim.pid} <= {_pid(t) for t in counted}, "both workers contribute measured trials"
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)], "nothing left hanging"
    killed = [t for t in trials if t.state == State.FAIL and _pid(t) == victim.pid]
    assert killed, "the victim held a RUNNING trial when it was killed"
    for lost in killed:  # each was re-queued by the heartbeat's retry callback and then measured
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
        assert retries, f"trial {lost.number} was not retried"
        assert any(t.state in (State.COMPLETE, State.PRUNED) and _pid(t) == survivor.pid for t in retries)
        # (a worker killed in the middle of suggesting leaves a partial point; the retry completes it)
        assert lost.params.items() <= retries[0].params.items()
