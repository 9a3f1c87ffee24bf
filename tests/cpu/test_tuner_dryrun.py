"""`mla-tune tune` end to end without a GPU: the interpreter dry run, several workers, an interrupted
study that resumes, the parallel compile path for sm_90 (compiled on the CPU, never launched), and
`mla-tune show`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuner.runtime import dispatch, paths
from tuner.runtime.spec import MLASpec
from tuner.tuning import finalize, measure, objective, representative, studies
from tuner.tuning import task as tasks

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_DECODE = MLASpec("decode", 8, 32, 16, 4)
TINY_PREFILL = MLASpec("prefill_causal", 8, 32, 16, 4)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", paths.ENV_CACHE_DIR: str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop(paths.ENV_GPU_KEY, None)
    env.update(extra)
    return env


def _tune(tmp_path: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tuner", "tune", "--dry-run", *args], cwd=REPO_ROOT,
                          env=_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _committed_tables() -> dict[str, bytes]:
    folder = REPO_ROOT / "generated" / "dispatch"
    return {p.name: p.read_bytes() for p in folder.glob("*.json")} if folder.is_dir() else {}


def test_dry_run_tunes_end_to_end_and_leaves_generated_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _committed_tables()
    start = time.monotonic()
    proc = _tune(tmp_path)  # no arguments: what `mla-tune tune` does on a machine without a GPU
    assert time.monotonic() - start < 120  # ~25 s alone; generous for a loaded 2-core CI machine
    assert _committed_tables() == before  # the committed tables are never written by a dry run
    assert "DRY RUN" in proc.stdout and "mean nothing" in proc.stdout
    for name in (TINY_DECODE.name(), TINY_PREFILL.name()):
        assert name in proc.stdout  # the summary table
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]  # a line per study
    assert all(" us, " in line and "4 trials" in line for line in progress)
    assert "left" in progress[0] and progress[-1].endswith("; done")
    table_path = tmp_path / "cache" / "dry-run" / "dispatch" / "cpu-interpreter.json"
    assert f"wrote 4 entries to {table_path}" in proc.stdout
    table = dispatch.load_table(table_path)
    decode = table.entry(TINY_DECODE.name(), "b1-16_kv1-2k")
    prefill = table.entry(TINY_PREFILL.name(), "q1-256")
    assert decode is not None and prefill is not None
    assert decode.trials == 4 and decode.default_time_us is not None
    assert decode.versions["cuda"] == "none"

    # The runtime picks the tuned entry up once it sits in a generated/ folder's dispatch/.
    monkeypatch.setenv(paths.ENV_GENERATED_DIR, str(tmp_path / "cache" / "dry-run"))
    monkeypatch.setenv(paths.ENV_CACHE_DIR, str(tmp_path / "cache"))  # where the tiny modules were rendered
    dispatch.reload()
    try:
        import torch

        assert dispatch.decode_config(TINY_DECODE, 3, 35.0, torch.device("cpu")) == decode.config
        assert dispatch.prefill_config(TINY_PREFILL, 26, 35.0, torch.device("cpu")) == prefill.config
    finally:
        dispatch.reload()


def test_two_interpreter_workers_and_out(tmp_path: Path) -> None:
    out = tmp_path / "tables"
    proc = _tune(tmp_path, "--workers", "2", "--variant", "decode", "--page-size", "1", "--trials", "4",
                 "--out", str(out))
    assert "worker" not in proc.stderr.lower() or "exited" not in proc.stderr
    table = dispatch.load_table(out / "cpu-interpreter.json")
    assert table.entry(MLASpec("decode", 8, 32, 16, 1).name(), "b1-16_kv1-2k").trials == 4


def _journal_trials(path: Path):
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return []
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage).get_trials(deepcopy=False)


def test_interrupted_study_resumes_and_loses_nothing(tmp_path: Path) -> None:
    """A worker killed mid-study (journal storage, no heartbeats) leaves a RUNNING trial; the next run
    fails and re-queues it (its process is gone), finishes the budget and exports."""
    import optuna

    from tuner.tuning.studies import counted_trials

    journal = tmp_path / "studies.journal"
    args = ["--storage", f"journal:{journal}", "--variant", "decode", "--page-size", "1", "--trials", "6"]
    victim = subprocess.Popen([sys.executable, "-m", "tuner", "tune", "--dry-run", *args, "--worker-index", "0"],
                              cwd=REPO_ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    State = optuna.trial.TrialState
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and victim.poll() is None
            trials = _journal_trials(journal) if journal.exists() else []
            if any(t.state == State.COMPLETE for t in trials) and any(t.state == State.RUNNING for t in trials):
                break
            time.sleep(0.2)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    lost = [t.number for t in _journal_trials(journal) if t.state == State.RUNNING]
    assert lost
    _tune(tmp_path, *args, "--out", str(tmp_path / "tables"))
    trials = _journal_trials(journal)
    assert counted_trials(trials) == 6
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    for number in lost:
        assert trials[number].state == State.FAIL
        assert any(t.user_attrs.get("retry_of") == number and t.state != State.FAIL for t in trials)
    assert (tmp_path / "tables" / "cpu-interpreter.json").is_file()


SM90_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    import tuner
    from tuner.tuning import precompile
    from tuner.tuning import space
    from tuner.runtime.config import DecodeConfig
    from tuner.runtime.spec import MLASpec
    from tuner.harness.inputs import Workload, make_inputs

    def capture(spec, config):
        w = Workload("w", spec.num_heads, (40, 17, 64), head_dim_ckv=spec.head_dim_ckv,
                     head_dim_kpe=spec.head_dim_kpe)
        x = make_inputs(w, spec.page_size, torch.bfloat16)
        launch = lambda: tuner.mla_decode(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.kv_indptr,
                                          x.kv_indices, x.sm_scale, x.kv_last_page_len, config=config)
        return precompile.capture(spec, launch), launch

    def main():
        target = GPUTarget("cuda", 90, 32)
        driver.set_active(precompile.make_stub_driver(target))  # this process: capture only
        small = MLASpec("decode", 16, 64, 16, 16)
        job, launch = capture(small, DecodeConfig(block_n=32, num_warps=4, num_stages=2, merge_block_d=64))
        assert sorted(k.function for k in job.kernels) == ["_decode_stage1", "_decode_stage2"], job
        big = MLASpec("decode", 16, 512, 64, 1)
        too_big, _ = capture(big, DecodeConfig(block_n=128, num_warps=8, num_stages=4))
        broken = precompile.CompileJob(small.name(), (precompile.KernelJob(small.name(), "_decode_stage1", "{}"),))
        pool = precompile.CompilePool(1, target)
        ok, oor, bad = (pool.submit(j).result(timeout=600) for j in (job, too_big, broken))
        pool.close()
        assert ok.error is None and ok.kernels == 2 and ok.shared_bytes > 0, ok
        assert oor.error is None and oor.shared_bytes > space.H100_SHARED_BYTES, oor
        assert bad.error is not None, bad
        # The compile worker filled Triton's cache: this process's own first launch finds the kernel
        # there (and then fails to launch it: there is no GPU).
        hits = []
        triton.knobs.compilation.listener = lambda *, cache_hit, **kw: hits.append(cache_hit)
        try:
            launch()
        except Exception:
            pass
        assert hits == [True], hits
        print("OK", ok.shared_bytes, ok.regs, oor.shared_bytes)

    if __name__ == "__main__":
        main()
""")


def test_parallel_compile_for_sm90_fills_the_cache_without_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton

    if not Path(triton.knobs.nvidia.ptxas.path).is_file():
        pytest.skip("Triton's NVIDIA backend has no ptxas here")
    script = tmp_path / "sm90.py"
    script.write_text(SM90_SCRIPT)
    env = _env(tmp_path, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_tuner_modules_import_no_optuna_until_they_run() -> None:
    code = ("import sys, tuner, tuner.runtime.dispatch, tuner.tuning.space, tuner.runtime.buckets, "
            "tuner.tuning.measure, "
            "tuner.tuning.precompile, tuner.tuning.command, tuner.tuning.show\n"
            "bad = [m for m in ('optuna', 'jinja2') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import tuner.tuning.search\nassert 'optuna' in sys.modules\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(Path("/nonexistent")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_exhaustive_needs_one_bucket_of_one_kernel() -> None:
    from tuner.cli import build_parser
    from tuner.tuning.command import build_tasks

    args = build_parser().parse_args(["tune", "--exhaustive"])
    with pytest.raises(SystemExit, match="one bucket of one kernel"):
        build_tasks(args, dry=False)
    args = build_parser().parse_args(["tune", "--exhaustive", "--variant", "decode", "--page-size", "64",
                                      "--buckets", "b17-96_kv2k+"])
    (task,) = build_tasks(args, dry=False)
    assert task.spec == MLASpec("decode", 16, 512, 64, 64) and task.bucket.name == "b17-96_kv2k+"
    with pytest.raises(SystemExit, match="unknown"):
        build_tasks(build_parser().parse_args(["tune", "--buckets", "b1-3"]), dry=False)


def test_default_catalogue_and_model_presets() -> None:
    from tuner.cli import build_parser
    from tuner.tuning.command import build_tasks

    tasks = build_tasks(build_parser().parse_args(["tune"]), dry=False)
    kernels = sorted({t.spec.name() for t in tasks})
    assert kernels == sorted(MLASpec(v, 16, 512, 64, ps).name()
                             for v in ("decode", "prefill_causal") for ps in (1, 64))
    assert len(tasks) == 2 * 6 + 2 * 4
    tasks = build_tasks(build_parser().parse_args(["tune", "--model", "deepseek-v3-tp1", "--variant", "decode",
                                                   "--page-size", "1", "--buckets", "b1-16_kv1-2k"]), dry=False)
    assert [t.spec.num_heads for t in tasks] == [128]
    dry = build_tasks(build_parser().parse_args(["tune"]), dry=True)
    assert {t.spec for t in dry} == {TINY_DECODE, TINY_PREFILL, MLASpec("decode", 8, 32, 16, 1),
                                     MLASpec("prefill_causal", 8, 32, 16, 1)} and all(t.tiny for t in dry)


def test_show_prints_the_module_and_the_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.cli import main

    spec = MLASpec("decode", 16, 512, 64, 1)
    assert main(["show", spec.name()]) == 0
    out = capsys.readouterr().out
    assert f"generated/{spec.name()}.py" in out and "b97+_kv2k+" in out and "default" in out
    assert main(["show", "mla_paged_nonsense"]) == 2
    table = tmp_path / "dispatch" / "cpu-interpreter.json"
    table.parent.mkdir()
    table.write_text(json.dumps({"schema_version": 0}))
    monkeypatch.setenv(paths.ENV_GENERATED_DIR, str(tmp_path))
    assert main(["show", spec.name()]) == 1
    assert "schema_version" in capsys.readouterr().err


def test_exhaustive_sweep_measures_every_point_once_and_compares_with_tpe() -> None:
    """The sweep and the TPE loop on a deliberately small space (in this process, interpreter)."""
    import dataclasses

    import optuna
    import torch

    from tuner.runtime import buckets
    from tuner.runtime.config import default_decode_config
    from tuner.tuning import space
    from tuner.tuning.precompile import CompilePool

    spec = TINY_DECODE
    task = tasks.Task(spec, buckets.DECODE_BUCKETS[0], tiny=True)
    default = dataclasses.replace(default_decode_config(spec, 3, 35, 4, hopper=False), block_n=16, num_stages=1)
    small = space.Space(spec, (space.Param("block_n", (16, 32)), space.Param("num_stages", (1, 2))),
                        tuple((k, v) for k, v in default.to_dict().items() if k not in ("block_n", "num_stages")))
    storage = optuna.storages.InMemoryStorage()
    bench = measure.Bench(spec, task.workload(), torch.device("cpu"), torch.float16)
    pool = CompilePool(1, None)
    heartbeat = studies.Heartbeat(None)
    results = {}
    try:
        for exhaustive, trials in ((False, 3), (True, 0)):
            settings = tasks.Settings(trials=trials, runs=1, warmup=0, final_runs=1, exhaustive=exhaustive,
                                       startup_trials=2)
            study = studies.open_study(f"t/{exhaustive}", storage, settings, small, default)
            objective.StudyRunner(task, study, small, lambda: bench, pool, space.Limits(), settings, heartbeat).run()
            results[exhaustive] = (study, finalize.finalize(task, study, small, bench, settings, None))
    finally:
        pool.close()
    grid_study, grid = results[True]
    params = [tuple(sorted(t.params.items())) for t in grid_study.get_trials() if t.state.is_finished()]
    assert sorted(params) == sorted(tuple(sorted(p.items())) for p in small.grid())  # each point once
    assert grid.counted == 4 and grid.entry is not None and grid.best is not None
    tpe_study, tpe = results[False]
    assert tpe.counted == 3 and tpe_study.trials[0].user_attrs.get("default") is True
    best = min(t.value for t in grid_study.trials if t.value is not None)
    report = finalize.tpe_vs_grid(tpe_study, best)
    assert report is not None and report["tpe_measured"] == 3 and report["tpe_best_us"] >= best * 0.5


def test_effective_key_of_warp_specialized_configs() -> None:
    """ws=1 configs that differ only in what the Gluon kernel ignores (num_warps, tma) are one launch on
    a Hopper; where the Gluon kernel cannot run (here: the interpreter) ws=1 is the Triton kernel."""
    import dataclasses

    import torch

    from tuner.runtime import buckets
    from tuner.runtime.config import DecodeConfig

    spec = MLASpec("decode", 64, 512, 64, 16)
    tiny = representative.tiny_workload(buckets.DECODE_BUCKETS[0], spec)
    bench = measure.Bench(spec, tiny, torch.device("cpu"), torch.float16)
    ws = DecodeConfig(block_h=64, block_n=16, num_warps=4, num_stages=2, tma=1, ws=1, merge_block_h=4)
    assert not bench.ws_runs
    assert bench.effective_key(ws) == bench.effective_key(dataclasses.replace(ws, ws=0))
    assert bench.effective_key(ws) != bench.effective_key(dataclasses.replace(ws, num_warps=8))
    bench.ws_runs = True  # as on a Hopper
    assert bench.effective_key(ws) == bench.effective_key(dataclasses.replace(ws, num_warps=8, tma=0))
    assert bench.effective_key(ws) != bench.effective_key(dataclasses.replace(ws, ws=0))
    assert bench.effective_key(ws) != bench.effective_key(dataclasses.replace(ws, num_stages=3))


def test_a_worker_killed_before_its_first_heartbeat_loses_nothing(tmp_path: Path) -> None:
    """A worker killed between ``study.ask()`` and its first heartbeat leaves a RUNNING trial with no
    heartbeat, which Optuna never fails by itself (CI saw the surviving worker wait for one until the
    test's timeout): the next worker to look seeds it, and one grace period later it is failed and
    re-queued like any other lost trial."""
    optuna = pytest.importorskip("optuna")
    from tuner.tuning.studies import make_storage, recover_lost_trials

    storage = make_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="orphan")
    orphan = study.ask()  # its owner dies here: no heartbeat recorded
    orphan.suggest_int("x", 0, 9)
    recover_lost_trials(study)
    assert study.get_trials()[orphan.number].state == optuna.trial.TrialState.RUNNING  # not yet stale
    time.sleep(3 * 1 + 1.5)  # the grace period (3 heartbeats) and a margin
    recover_lost_trials(study)
    trials = study.get_trials()
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert [t.state for t in retries] == [optuna.trial.TrialState.WAITING]
    assert retries[0].params == orphan.params


def test_kv_dtype_selects_the_fp8_kernels(tmp_path: Path) -> None:
    """``--kv-dtype fp8`` tunes the fp8 modules (their own table entries; the 16-bit default untouched),
    ``both`` each shape twice, the catalogue filtered the same way; a dry run over an fp8 cache ends in a
    table entry of the fp8 module (its gate: the reference over the dequantized cache)."""
    from tuner.cli import build_parser
    from tuner.tuning.command import build_tasks

    def kernels(*args: str) -> set[str]:
        return {t.spec.name() for t in build_tasks(build_parser().parse_args(["tune", *args]), dry=False)}

    assert kernels() == {MLASpec(v, 16, 512, 64, ps).name() for v in ("decode", "prefill_causal") for ps in (1, 64)}
    fp8 = kernels("--kv-dtype", "fp8")
    assert fp8 == {MLASpec(v, 16, 512, 64, ps, True).name() for v in ("decode", "prefill_causal") for ps in (1, 64)}
    assert kernels("--kv-dtype", "both") == kernels() | fp8
    assert all(n.endswith("_fp8e4m3") for n in kernels("--catalogue", "--kv-dtype", "fp8", "--heads", "8"))
    out = tmp_path / "tables"
    _tune(tmp_path, "--kv-dtype", "fp8", "--variant", "decode", "--page-size", "1", "--trials", "3", "--out", str(out))
    table = dispatch.load_table(out / "cpu-interpreter.json")
    assert table.entry(MLASpec("decode", 8, 32, 16, 1, True).name(), "b1-16_kv1-2k").trials == 3
    assert table.entry(MLASpec("decode", 8, 32, 16, 1).name(), "b1-16_kv1-2k") is None


def test_missing_tunes_only_what_the_table_lacks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ("--page-size", "1", "--trials", "2", "--out", str(out))
    _tune(tmp_path, "--variant", "decode", *common)
    proc = _tune(tmp_path, "--variant", "decode", "prefill_causal", "--missing", *common)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 1 and progress[0].startswith("[1/1]") and TINY_PREFILL.name().replace("ps4", "ps1") \
        in progress[0], proc.stdout  # the decode bucket is in the table already
    proc = _tune(tmp_path, "--variant", "decode", "prefill_causal", "--missing", *common)
    assert "nothing to tune" in proc.stdout and not any(line.startswith("[") for line in proc.stdout.splitlines())


def test_missing_keeps_buckets_tuned_for_another_kernel_version(tmp_path: Path) -> None:
    from tuner.runtime.buckets import buckets_for
    from tuner.runtime.config import DecodeConfig
    from tuner.runtime.device import GPUInfo
    from tuner.runtime.loader import module_hash
    from tuner.tuning.command import missing_tasks

    spec = MLASpec("decode", 16, 512, 64, 64)
    b1, b2, b3 = list(buckets_for(spec))[:3]
    todo = [tasks.Task(spec, b) for b in (b1, b2, b3)]
    table = tmp_path / "gpu-x.json"
    assert missing_tasks(todo, table) == todo  # no table yet: everything
    gpu = GPUInfo(key="gpu-x", name="GPU X", capability="9.0", num_sms=132)
    current = dispatch.Entry(DecodeConfig(), 10.0, None, module_hash(spec), 3, dispatch.versions())
    stale = dispatch.Entry(DecodeConfig(), 10.0, None, "0" * 16, 3, dispatch.versions())
    dispatch.merge(gpu, {(spec.name(), b1.name): current, (spec.name(), b2.name): stale}, tmp_path)
    assert [t.bucket.name for t in missing_tasks(todo, table)] == [b2.name, b3.name]
    table.write_text("{")
    with pytest.raises(SystemExit, match="--missing"):
        missing_tasks(todo, table)


def test_workers_get_the_selection_flags() -> None:
    import argparse

    from tuner.tuning import command

    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args(["--kv-dtype", "fp8", "--missing", "--catalogue", "--workers", "2"])
    argv = command._worker_argv(args, 1, "journal:/x", 3)
    assert argv[argv.index("--kv-dtype") + 1] == "fp8" and "--missing" in argv and "--catalogue" in argv
