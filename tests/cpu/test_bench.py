"""``mla-tune bench``: the dry run end to end (table, bench.json / bench.csv schema, figure or its
message, skipped peers, --compare, a shape of your own, --set and rows with their own page size), the
benchmark set's rows, the fused cache layout, the eager timing, the floor / ratio arithmetic, the
reference check, and the peer adapters that run without a GPU (PyTorch; FlashMLA's layout conversion
against a fake ``flash_mla`` module; SGLang's kernel under the interpreter when its staged module is
importable).

The command-line runs happen in a subprocess without CUDA (``CUDA_VISIBLE_DEVICES=""``): the dry run
switches the Triton interpreter on, which must not leak into a GPU test process.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tuner.bench import report as bench_report
from tuner.bench import rows as bench_rows
from tuner.bench import run as bench_run
from tuner.bench.flashmla import FlashMLAPeer, block_table, flashmla_to_bench
from tuner.bench.ours import OursPlanRun
from tuner.bench.peers import PEER_KEYS, SGLangPeer, TorchPeer, sglang_kv_splits, token_slots
from tuner.cli import main
from tuner.harness import floors, timing
from tuner.harness.check import TOLERANCES
from tuner.harness.inputs import ROW_SETS, Workload, benchmark_set, make_inputs
from tuner.harness.reference import kv_lengths, mla_decode_ref, mla_prefill_ref

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def mla_tune(*args: str, interpret: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m tuner bench ...`` in a fresh interpreter that sees no GPU (``interpret``: started with
    TRITON_INTERPRET=1, as a user who knows; else without it, as one who does not)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    if not interpret:
        env.pop("TRITON_INTERPRET")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "tuner", "bench", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One full dry run: (its stdout, the folder it wrote)."""
    out = tmp_path_factory.mktemp("bench")
    return ok(mla_tune("--dry-run", "--out", str(out))), out / "cpu-interpreter"


# ---------------------------------------------------------------------------------------------------
# The dry run, end to end
# ---------------------------------------------------------------------------------------------------

def test_dry_run_says_so_and_prints_a_line_per_row_and_page_size(dry_run: tuple[str, Path]) -> None:
    stdout, _ = dry_run
    assert stdout.startswith(bench_report.DRY_RUN_NOTE)
    assert stdout.rstrip().count("timings mean nothing") >= 2  # at the start and in the summary
    header = next(line for line in stdout.splitlines() if line.startswith("row "))
    for key in ("ours µs", "GB/s", "TFLOP/s", "floor", "fn µs", "fa3 µs", "torch µs"):
        assert key in header
    lines = [line.split() for line in stdout.splitlines() if line.startswith("dry-")]
    assert [(cols[0], cols[1]) for cols in lines] == [
        (w.name, str(ps)) for w in bench_rows.dry_run_set() for ps in bench_rows.page_sizes_of(w, [1, 64])]
    assert ("dry-o-ps16-b3", "16") in [(cols[0], cols[1]) for cols in lines]  # its own page size only
    for cols in lines:
        float(cols[2])  # ours was checked and timed on every row


def test_dry_run_reports_the_skipped_peers(dry_run: tuple[str, Path]) -> None:
    stdout, _ = dry_run
    for key in ("fa3", "fa2", "flashmla", "sglang"):
        assert stdout.count(f"skipped {key}: dry run: only the PyTorch peer runs") == 1  # once, not twice
    assert "eager per-call time: not measured (CUDA only" in stdout
    assert bench_report.EAGER_TITLE not in stdout
    assert "wrote " in stdout


def test_dry_run_json_schema(dry_run: tuple[str, Path]) -> None:
    _, folder = dry_run
    doc = bench_report.load_results(folder / "bench.json")
    assert doc["dry_run"] is True and doc["note"] == bench_report.DRY_RUN_NOTE
    assert {"gpu", "gpu_key", "torch", "triton", "cuda", "date", "num_sms"} <= set(doc["env"])
    assert doc["env"]["gpu_key"] == "cpu-interpreter"
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    assert doc["settings"]["dtype"] == "float16" and doc["settings"]["page_sizes"] == [1, 64]
    assert doc["settings"]["cache_layout"] == "auto" and doc["settings"]["eager"] is None  # CUDA only
    assert list(doc["impls"]) == ["ours", "ours_fn", "ours_default", *PEER_KEYS]
    assert doc["impls"]["torch"]["available"] and not doc["impls"]["fa3"]["available"]
    assert not doc["impls"]["flashmla"]["available"]
    assert [(row["row"], row["page_size"]) for row in doc["rows"]] == [
        (w.name, ps) for w in bench_rows.dry_run_set() for ps in bench_rows.page_sizes_of(w, [1, 64])]
    for row in doc["rows"]:
        assert {"row", "kind", "heads", "batch", "total_q", "kv_tokens", "page_size", "cache", "bytes", "flops",
                "floor_us", "checked_seqs", "impls"} <= set(row)
        assert row["floor_us"] > 0 and row["checked_seqs"] == row["batch"]
        assert row["cache"] == ("fused" if row["page_size"] == 64 else "split")  # ours passes on the views
        for key in ("ours", "ours_fn", "ours_default", "torch"):
            e = row["impls"][key]
            assert e["status"] == "ok", e
            assert "eager_us" not in e and "eager_calls" not in e
            assert e["median_us"] > 0 and e["method"] == "wall-clock" and e["runs"] == bench_run.DRY_RUN_RUNS
            assert e["rel_err"] < 1e-2 and e["lse_err"] <= TOLERANCES[torch.float16].lse
            assert e["floor_frac"] == pytest.approx(row["floor_us"] / e["median_us"], rel=1e-3)
        assert row["impls"]["torch"]["ours_over"] == pytest.approx(
            row["impls"]["ours"]["median_us"] / row["impls"]["torch"]["median_us"], rel=1e-3)
        # a speculative row (2 queries x 16 heads) runs packed in the decode kernel of 32 heads
        speculative = row["row"].startswith("dry-mtp2")
        kind, heads = ("decode", 32) if speculative else (row["kind"], 16)
        kernel = f"mla_paged_{kind}_h{heads}_ckv512_kpe64_ps{row['page_size']}"
        assert row["impls"]["ours"]["info"]["kernel"] == kernel
        assert row["impls"]["fa3"]["status"] == "skipped"


def test_dry_run_csv_schema(dry_run: tuple[str, Path]) -> None:
    _, folder = dry_run
    with open(folder / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == bench_report.CSV_COLUMNS
        lines = list(reader)
    doc = json.loads((folder / "bench.json").read_text())
    assert len(lines) == sum(len(row["impls"]) for row in doc["rows"])
    assert {line["gpu_key"] for line in lines} == {"cpu-interpreter"}
    assert {line["eager_us"] for line in lines} == {""}  # a dry run does not time eagerly
    assert {line["cache"] for line in lines} == {"split", "fused"}
    ours = [line for line in lines if line["impl"] == "ours"]
    assert [(line["row"], int(line["page_size"])) for line in ours] == [
        (row["row"], row["page_size"]) for row in doc["rows"]]
    assert all(line["status"] == "ok" and float(line["median_us"]) > 0 for line in ours)


def test_dry_run_figure(dry_run: tuple[str, Path]) -> None:
    stdout, folder = dry_run
    if HAS_MATPLOTLIB:
        assert (folder / "bench.png").stat().st_size > 0
    else:  # CI: matplotlib is an optional dependency
        assert not (folder / "bench.png").exists()
        assert "matplotlib is not installed" in stdout


def test_compare_reruns_the_rows_of_a_results_file(dry_run: tuple[str, Path], tmp_path: Path) -> None:
    _, folder = dry_run
    stdout = ok(mla_tune("--dry-run", "--compare", str(folder / "bench.json"), "--rows", "dry-d-b3",
                         "--page-size", "1", "--tolerance", "1000", "--no-figure", "--out", str(tmp_path)))
    assert "compare with" in stdout and "ours within tolerance" in stdout
    assert any(line.startswith("dry-d-b3") and "ours " in line for line in stdout.splitlines()[-6:])


def test_plain_bench_without_cuda_is_a_dry_run_and_takes_a_shape_of_your_own(tmp_path: Path) -> None:
    stdout = ok(mla_tune("--heads", "16", "--batch", "2", "--kv-len", "20", "--q-len", "4",
                         "--page-size", "1", "--no-figure", "--out", str(tmp_path)))
    assert "no CUDA device: this is a dry run" in stdout
    assert any(line.startswith("h16-b2-q4-kv20   1 ") for line in stdout.splitlines())
    doc = bench_report.load_results(tmp_path / "cpu-interpreter" / "bench.json")
    (row,) = doc["rows"]
    assert row["kind"] == "prefill_causal" and row["workload"]["q_lens"] == [4, 4]
    assert [w.name for w in bench_rows.rows_of(doc)] == ["h16-b2-q4-kv20"]


@pytest.mark.parametrize("args, message", [
    (["--heads", "16"], "missing --batch --kv-len"),
    (["--rows", "d-b1-1k"], "unknown id"),  # a dry run knows only its tiny rows
    (["--page-size", "3"], "powers of two"),
    (["--heads", "16", "--batch", "1", "--kv-len", "8", "--q-len", "9"], "q_len"),
])
def test_bad_arguments_exit_2_naming_the_problem(args: list[str], message: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """In process (these fail before any kernel loads); the dry run's TRITON_INTERPRET is restored."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    assert main(["bench", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_set_selects_its_rows_and_an_off_table_row_keeps_its_page_size(tmp_path: Path) -> None:
    """--set off in a dry run: only its stand-in, at its own page size 16 whatever --page-size says; its
    results file reruns it at 16 with --compare (in the file's cache layout)."""
    stdout = ok(mla_tune("--set", "off", "--page-size", "1", "64", "--cache-layout", "split", "--no-figure",
                         "--out", str(tmp_path / "a")))
    assert [line.split()[:2] for line in stdout.splitlines() if line.startswith("dry-")] == [
        ["dry-o-ps16-b3", "16"]]
    path = tmp_path / "a" / "cpu-interpreter" / "bench.json"
    doc = bench_report.load_results(path)
    assert doc["settings"]["cache_layout"] == "split" and doc["rows"][0]["cache"] == "split"
    assert [(w.name, w.page_size) for w in bench_rows.rows_of(doc)] == [("dry-o-ps16-b3", 16)]
    stdout = ok(mla_tune("--compare", str(path), "--tolerance", "1000", "--no-figure",
                         "--out", str(tmp_path / "b")))
    assert any(line.startswith("dry-o-ps16-b3  16 ours ") for line in stdout.splitlines())
    assert "different cache layout" not in stdout and "ours within tolerance" in stdout
    again = bench_report.load_results(tmp_path / "b" / "cpu-interpreter" / "bench.json")
    assert again["settings"]["cache_layout"] == "split" and again["settings"]["page_sizes"] == [1, 64]


@pytest.mark.parametrize("args, message", [
    (["--set", "mtp", "--rows", "dry-d-b3"], "unknown id"),
    (["--set", "off", "--rows", "dry-mtp2-b3"], "expected some of ['dry-o-ps16-b3']"),
])
def test_rows_are_chosen_within_the_set(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    assert main(["bench", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The benchmark set's rows
# ---------------------------------------------------------------------------------------------------

def test_benchmark_set_rows_and_sets() -> None:
    rows = {w.name: w for w in benchmark_set()}
    assert len(rows) == 13 + 3 + 7 and list(ROW_SETS) == ["public", "mtp", "off"]
    assert [w.name for w in benchmark_set(["mtp"])] == ["mtp2-h16-b64-4k", "mtp2-h128-b64-4k", "mtp4-h128-b32-8k"]
    assert len(benchmark_set(["public"])) == 13 and all(w.page_size is None for w in benchmark_set(["public"]))
    for name, heads, batch, s_q, kv in (("mtp2-h16-b64-4k", 16, 64, 2, 4096), ("mtp2-h128-b64-4k", 128, 64, 2, 4096),
                                        ("mtp4-h128-b32-8k", 128, 32, 4, 8192)):
        w = rows[name]
        assert (w.heads, w.batch, w.q_lens, w.kv_lens, w.causal) == (heads, batch, (s_q,) * batch, (kv,) * batch, True)
        assert w.is_speculative and w.queries_per_request == s_q and w.page_size is None
        assert w.spec(64).variant == "prefill_causal"
        # query j sits at kv - s_q + j and sees kv - s_q + j + 1 tokens
        assert w.visible_pairs() == batch * sum(kv - s_q + j + 1 for j in range(s_q))
    off = {w.name: w for w in benchmark_set(["off"])}
    assert {n: (w.heads, w.page_size, w.is_decode) for n, w in off.items()} == {
        "o-h16-ps16-b12-short": (16, 16, True), "o-h64-ps64-b32-4k": (64, 64, True),
        "o-h32-ps32-b64-2k": (32, 32, True), "o-h8-ps1-b128-1k": (8, 1, True),
        "o-h128-ps16-b16-8k": (128, 16, True), "o-p-h64-ps16-8x1k": (64, 16, False),
        "o-p-h32-ps32-4x2k": (32, 32, False)}
    assert off["o-h16-ps16-b12-short"].kv_lens == (3, 9, 17, 31, 48, 64, 80, 100, 130, 200, 260, 400)
    assert off["o-p-h64-ps16-8x1k"].q_lens == (1024,) * 8 and off["o-p-h64-ps16-8x1k"].kv_lens == (1536,) * 8
    assert off["o-p-h32-ps32-4x2k"].q_lens == off["o-p-h32-ps32-4x2k"].kv_lens == (2048,) * 4
    assert not any(w.is_speculative for w in benchmark_set(["public", "off"]))  # p-8x512-prefix: 512 queries
    assert bench_rows.page_sizes_of(off["o-h8-ps1-b128-1k"], [16, 64]) == [1]
    assert bench_rows.page_sizes_of(rows["mtp2-h16-b64-4k"], [1, 64]) == [1, 64]
    with pytest.raises(ValueError, match="unknown"):
        benchmark_set(["fp8"])


def test_select_rows_by_set_and_id() -> None:
    assert [w.name for w in bench_rows.select_rows(None, False, "mtp")] == [
        w.name for w in benchmark_set(["mtp"])]
    assert len(bench_rows.select_rows(None, False)) == len(benchmark_set())  # default: all
    assert [w.name for w in bench_rows.select_rows(["o-h8-ps1-b128-1k", "d-b1-1k"], False, "all")] == [
        "o-h8-ps1-b128-1k", "d-b1-1k"]
    with pytest.raises(ValueError, match="unknown id"):
        bench_rows.select_rows(["d-b1-1k"], False, "off")
    with pytest.raises(ValueError, match="set: expected one of"):
        bench_rows.select_rows(None, False, "fp8")
    assert [w.name for w in bench_rows.select_rows(None, True, "mtp")] == ["dry-mtp2-b3"]


def test_results_round_trip_the_rows_and_their_page_size() -> None:
    """Known rows come back by name (with their own page size); a shape of your own from its stored
    definition, page size included; files written before the field read as None."""
    custom = Workload("mine", 32, (40, 3), (2, 2), page_size=32)
    stored = {**bench_rows._workload_dict(custom)}
    old_style = {k: v for k, v in stored.items() if k != "page_size"}
    doc = {"rows": [{"row": "o-h16-ps16-b12-short"}, {"row": "mtp4-h128-b32-8k"}, {"row": "mine", "workload": stored},
                    {"row": "mine"}, {"row": "older", "workload": old_style}]}
    got = bench_rows.rows_of(doc)
    assert [w.name for w in got] == ["o-h16-ps16-b12-short", "mtp4-h128-b32-8k", "mine", "older"]
    assert got[0].page_size == 16 and got[1].q_lens == (4,) * 32 and got[2] == custom
    assert got[3].page_size is None and got[3].q_lens == (2, 2)


def test_compare_warns_of_another_cache_layout() -> None:
    def doc(layout: str | None) -> dict:
        settings = {} if layout is None else {"cache_layout": layout}
        return {"env": {"gpu": "g", "gpu_key": "g", "date": "d"}, "settings": settings,
                "rows": [{"row": "r", "page_size": 16, "impls": {"ours": {"status": "ok", "median_us": 10.0}}}]}

    assert bench_report.cache_layout(doc(None)) == "split"  # written before the setting
    lines, within = bench_report.compare(doc(None), doc("auto"), tolerance=0.05)
    assert within and "warning: different cache layout (split then, auto now)" in lines
    assert not any("cache layout" in line for line in bench_report.compare(doc("auto"), doc("auto"), 0.05)[0])


def test_fused_inputs_are_views_of_one_cache_with_the_same_values() -> None:
    w = Workload("w", 4, (70, 5, 33), (2, 2, 2), head_dim_ckv=64, head_dim_kpe=32)
    split = make_inputs(w, 64, torch.float32, seed=5)
    fused = make_inputs(w, 64, torch.float32, seed=5, fused=True)
    assert split.kv_cache is None and fused.kv_cache is not None
    assert fused.kv_cache.shape == (split.ckv_cache.shape[0], 64, 96) and fused.kv_cache.is_contiguous()
    assert fused.ckv_cache.data_ptr() == fused.kv_cache.data_ptr()
    assert fused.kpe_cache.data_ptr() == fused.kv_cache[..., 64:].data_ptr()
    assert fused.ckv_cache.stride() == (64 * 96, 96, 1)
    for a, b in ((split.ckv_cache, fused.ckv_cache), (split.kpe_cache, fused.kpe_cache), (split.q_nope, fused.q_nope)):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.equal(split.kv_indices, fused.kv_indices)


# ---------------------------------------------------------------------------------------------------
# Eager timing
# ---------------------------------------------------------------------------------------------------

def test_eager_calls_per_batch() -> None:
    assert timing.eager_calls_for(10e-6) == 100  # short calls: the full batch
    assert timing.eager_calls_for(2e-3) == 50  # 0.1 s of 2 ms calls
    assert timing.eager_calls_for(0.5) == 10  # never below the minimum
    assert timing.eager_calls_for(0.5, calls=4) == 4  # nor above the batch asked for
    assert timing.eager_calls_for(0.0) == 100


def test_time_eager_divides_a_batch_by_its_calls() -> None:
    calls = []
    t = timing.time_eager(lambda: calls.append(1), device=torch.device("cpu"), calls=7, batches=3, warmup=2)
    assert (t.calls, t.batches) == (7, 3) and len(calls) == 2 + 7 + 3 * 7  # warm-up, estimate, batches
    assert 0 < t.p10_us <= t.median_us <= t.p90_us


def test_run_impl_records_eager_time_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the bench sets ``eager``; here it is set on the CPU to check the fields and the table."""
    w = bench_rows.dry_run_set()[0]
    x = make_inputs(w, 1, torch.float32, seed=0)
    ref_out, ref_lse, _ = bench_run.reference_prefix(w, x, 0)
    s = bench_run.Settings(torch.device("cpu"), torch.float32, runs=2, warmup=1, check_seqs=0, seed=0,
                           dry_run=True, eager=True)
    monkeypatch.setattr(bench_run, "time_eager", lambda fn, **kw: timing.time_eager(fn, calls=3, batches=2, **kw))
    entry = bench_run.run_impl(TorchPeer(), w, x, 1, (ref_out, ref_lse), s)
    assert entry["status"] == "ok" and entry["eager_us"] > 0 and entry["eager_calls"] == 3
    assert not OursPlanRun(default=True).eager  # the untuned form shares ours' host path: not timed eagerly
    off = bench_run.run_impl(TorchPeer(), w, x, 1, (ref_out, ref_lse), dataclasses.replace(s, eager=False))
    assert "eager_us" not in off
    row = {"row": w.name, "page_size": 1, "impls": {"ours": {"status": "ok", "median_us": 10.0, "eager_us": 25.0},
                                                   "ours_fn": {"status": "ok", "median_us": 10.0},
                                                   "torch": entry, "fa3": {"status": "skipped"}}}
    lines = bench_report.eager_table([row], ["ours", "ours_fn", "torch", "fa3"], 10)
    assert lines[1] == bench_report.EAGER_TITLE and lines[2].split() == ["row", "ps", "ours", "fn", "torch", "fa3",
                                                                         "|", "ours", "e/g"]
    cols = lines[3].split()
    assert cols[:3] == [w.name, "1", "25.0"] and cols[3] == "-" and cols[5] == "-" and cols[-1] == "2.50"


# ---------------------------------------------------------------------------------------------------
# Arithmetic and checks
# ---------------------------------------------------------------------------------------------------

def test_floor_is_the_larger_of_the_memory_and_compute_times() -> None:
    copy, matmul = 3.0e12, 690e12
    assert floors.floor_us(3.0e9, 1.0e11, copy, matmul) == pytest.approx(1000.0)  # memory bound
    assert floors.floor_us(3.0e6, 6.9e14, copy, matmul) == pytest.approx(1.0e6)  # compute bound
    w = bench_rows.dry_run_set()[0]
    assert floors.floor_us(w.bytes_moved(), w.flops(), copy, matmul) == pytest.approx(
        max(w.bytes_moved() / copy, w.flops() / matmul) * 1e6)


def test_rates_fraction_and_ratio() -> None:
    gbps, tflops = floors.achieved(2.0e9, 5.0e12, 1000.0)  # 2 GB and 5 TFLOP in 1 ms
    assert gbps == pytest.approx(2000.0) and tflops == pytest.approx(5000.0)
    assert floors.floor_fraction(80.0, 100.0) == pytest.approx(0.8)
    assert floors.ratio(90.0, 100.0) == pytest.approx(0.9)
    assert floors.ratio(None, 100.0) is None and floors.ratio(90.0, None) is None


def test_derived_figures_of_a_row() -> None:
    row = {"bytes": 3.0e9, "flops": 1.0e12, "floor_us": 1000.0, "impls": {
        "ours": {"median_us": 1250.0}, "torch": {"median_us": 5000.0}, "fa3": {"status": "n/a"}}}
    bench_run._derive(row)
    assert row["impls"]["ours"]["floor_frac"] == pytest.approx(0.8)
    assert row["impls"]["ours"]["gbps"] == pytest.approx(2400.0)
    assert row["impls"]["torch"]["ours_over"] == pytest.approx(0.25)
    assert "ours_over" not in row["impls"]["ours"] and "gbps" not in row["impls"]["fa3"]


def test_check_output_catches_what_it_must() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 2, 8, generator=g)
    ref_lse = torch.randn(4, 2, generator=g)
    ref_lse[0, 0] = float("-inf")
    ref[0, 0] = 0.0  # a row that sees no token: output exactly 0
    assert bench_run.check_output(ref.half(), ref_lse.clone(), ref, ref_lse)[0]
    assert bench_run.check_output(ref, None, ref, ref_lse)[0]  # a peer without lse: output only
    nan = ref.clone()
    nan[1, 1, 1] = float("nan")
    assert "non-finite values (NaN or inf)" in bench_run.check_output(nan, ref_lse, ref, ref_lse)[3]
    passed, rel, _, why = bench_run.check_output(ref * 1.1, ref_lse, ref, ref_lse)
    assert not passed and rel == pytest.approx(0.1, rel=1e-4) and "miss atol" in why
    nonzero = ref.clone()
    nonzero[0, 0, 0] = 1e-3
    assert "exactly 0" in bench_run.check_output(nonzero, ref_lse, ref, ref_lse)[3]
    assert "lse error" in bench_run.check_output(ref, ref_lse + 2e-3, ref, ref_lse)[3]
    finite = ref_lse.clone()
    finite[0, 0] = 0.0
    assert "-inf" in bench_run.check_output(ref, finite, ref, ref_lse)[3]


def test_compare_flags_our_deviations_only() -> None:
    def doc(ours: float, peer: float, status: str = "ok") -> dict:
        impls = {"ours": {"status": status, "median_us": ours if status == "ok" else None},
                 "fa3": {"status": "ok", "median_us": peer}}
        return {"env": {"gpu": "g", "gpu_key": "g", "date": "d"},
                "rows": [{"row": "r", "page_size": 1, "impls": impls}]}

    lines, within = bench_report.compare(doc(100.0, 50.0), doc(103.0, 80.0), tolerance=0.05)
    assert within and any("+3.0%" in line for line in lines) and any("outside" in line for line in lines)
    assert not bench_report.compare(doc(100.0, 50.0), doc(110.0, 50.0), tolerance=0.05)[1]
    assert not bench_report.compare(doc(100.0, 50.0), doc(0.0, 50.0, status="wrong"), tolerance=0.05)[1]


# ---------------------------------------------------------------------------------------------------
# Peer adapters that run without a GPU
# ---------------------------------------------------------------------------------------------------

KV_LENS = (0, 1, 37, 40, 16)
Q_LENS = (0, 1, 5, 40, 3)


def small(kind: str) -> Workload:
    """An empty sequence, one token, partial and whole pages (at page size 16); heads 8, narrow dims."""
    if kind == "decode":
        return Workload(kind, 8, KV_LENS, head_dim_ckv=64, head_dim_kpe=32)
    return Workload(kind, 8, KV_LENS, Q_LENS, causal=kind == "prefill_causal", head_dim_ckv=64,
                    head_dim_kpe=32)


def reference(w: Workload, x) -> tuple[torch.Tensor, torch.Tensor]:
    if w.is_decode:
        return mla_decode_ref(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.kv_indptr, x.kv_indices,
                              x.sm_scale, x.kv_last_page_len)
    return mla_prefill_ref(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.qo_indptr, x.kv_indptr, x.kv_indices,
                           x.sm_scale, x.kv_last_page_len, causal=w.causal)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", ["decode", "prefill_causal", "prefill"])
def test_torch_peer_matches_the_reference(kind: str, page_size: int) -> None:
    w = small(kind)
    x = make_inputs(w, page_size, torch.float32, seed=3, spare_pages=3)  # NaN in unused slots
    out, lse = TorchPeer().prepare(w, x, page_size).call()
    ref_out, ref_lse = reference(w, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)  # -inf where a row sees nothing
    assert bench_run.check_output(out, lse, ref_out, ref_lse)[0]


def test_token_slots_list_each_sequence_tokens_in_order() -> None:
    w = small("decode")
    x = make_inputs(w, 16, torch.float32, seed=1)
    lens = kv_lengths(x.kv_indptr, 16, x.kv_last_page_len)
    slot_indptr, slots = token_slots(x.kv_indptr, x.kv_indices, lens, 16)
    assert slot_indptr.dtype == torch.int32 and slot_indptr.tolist() == [0, 0, 1, 38, 78, 94]
    pages, ptr = x.kv_indices.tolist(), x.kv_indptr.tolist()
    expected = [pages[ptr[b] + t // 16] * 16 + t % 16 for b, n in enumerate(KV_LENS) for t in range(n)]
    assert slots.tolist() == expected
    assert torch.isfinite(x.ckv_cache.reshape(-1, 64)[slots]).all()  # never a poisoned unused slot


def test_sglang_kv_splits_rule() -> None:
    # one short sequence on 132 SMs: the fill rule asks for many programs, capped at 8
    assert sglang_kv_splits([1024], 16, 132) == [8]
    # 4096 tokens: 132 * log2(4096 / 64) = 792 programs over 256 sequences -> 4 splits each
    assert sglang_kv_splits([4096] * 256, 16, 132) == [4] * 256
    # 128 heads are 8 head groups: 32 sequences x 8 groups = 256 programs -> 4 splits each
    assert sglang_kv_splits([4096] * 32, 128, 132) == [4] * 32
    assert sglang_kv_splits([4096] * 8, 16, 132) == [8] * 8  # capped at max_kv_splits
    # skew: the long sequence gets the most splits, short ones one
    assert sglang_kv_splits([500, 1000, 9000], 16, 132) == [1, 1, 8]
    assert sglang_kv_splits([0, 5], 16, 4, max_kv_splits=4) == [1, 3]  # never 0, never above the cap
    assert sglang_kv_splits([], 16, 132) == []


def test_block_table_rows_are_each_sequence_pages_padded() -> None:
    w = small("decode")
    x = make_inputs(w, 16, torch.float32, seed=1)
    table = block_table(x.kv_indptr, x.kv_indices, pad=0)
    pages, ptr = x.kv_indices.tolist(), x.kv_indptr.tolist()
    width = max(ptr[b + 1] - ptr[b] for b in range(len(KV_LENS)))
    assert table.dtype == torch.int32 and table.is_contiguous() and table.shape == (len(KV_LENS), width)
    for b in range(len(KV_LENS)):
        n = ptr[b + 1] - ptr[b]
        assert table[b].tolist() == pages[ptr[b]:ptr[b + 1]] + [0] * (width - n)
    empty = block_table(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert empty.shape == (2, 0)


def test_flashmla_results_become_the_bench_layout() -> None:
    batch, s_q, heads, ckv = 3, 2, 4, 8
    out = torch.randn(batch, s_q, heads, ckv)
    lse = torch.randn(batch, heads, s_q)
    rows, lse2 = flashmla_to_bench(out, lse)
    assert rows.shape == (batch * s_q, heads, ckv) and lse2 is not None and lse2.shape == (batch * s_q, heads)
    for b in range(batch):
        for j in range(s_q):
            assert torch.equal(rows[b * s_q + j], out[b, j])
            torch.testing.assert_close(lse2[b * s_q + j], lse[b, :, j] / math.log(2.0))


def fake_flash_mla(calls: list[dict]) -> types.ModuleType:
    """FlashMLA's legacy dense call restated in plain PyTorch from its documented interface (block table,
    cache_seqlens, causal among the s_q queries of a request, natural-log lse [B, H, s_q])."""
    module = types.ModuleType("flash_mla")

    def get_mla_metadata(*args: object, **kwargs: object) -> tuple[types.SimpleNamespace, None]:
        return types.SimpleNamespace(filled=False), None

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=None,
                               causal=False, use_legacy=False):
        assert use_legacy and k_cache.dim() == 4 and k_cache.shape[1:3] == (64, 1) and q.is_contiguous()
        calls.append({"kv_ptr": k_cache.data_ptr(), "causal": causal, "meta_filled": meta.filled})
        meta.filled = True
        batch, s_q, heads, dim = q.shape
        out = torch.zeros(batch, s_q, heads, head_dim_v, dtype=q.dtype)
        lse = torch.empty(batch, heads, s_q)
        for b in range(batch):
            n = int(cache_seqlens[b])
            keys = k_cache[block_table[b, : -(-n // 64)].long(), :, 0].reshape(-1, dim)[:n].float()
            scores = torch.einsum("jhd,td->hjt", q[b].float(), keys) * softmax_scale
            if causal:
                scores = scores.masked_fill(torch.arange(n)[None, :] > n - s_q + torch.arange(s_q)[:, None],
                                            float("-inf"))
            lse[b] = torch.logsumexp(scores, -1)
            out[b] = (torch.softmax(scores, -1) @ keys[:, :head_dim_v]).transpose(0, 1).to(q.dtype)
        return out, lse

    module.get_mla_metadata = get_mla_metadata  # type: ignore[attr-defined]
    module.flash_mla_with_kvcache = flash_mla_with_kvcache  # type: ignore[attr-defined]
    return module


def test_flashmla_adapter_is_unavailable_without_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = FlashMLAPeer()
    assert peer.unavailable(torch.device("cpu"), torch.bfloat16) == "needs CUDA"
    monkeypatch.setitem(sys.modules, "flash_mla", None)  # an import of it fails
    why = peer.unavailable(torch.device("cuda"), torch.bfloat16)
    assert why is not None and why.startswith("not importable")
    assert "float32" in (peer.unavailable(torch.device("cuda"), torch.float32) or "")
    assert peer.not_applicable(Workload("d", 16, (100,)), 1) == "page size 64 only"
    assert peer.not_applicable(Workload("d", 16, (100,)), 64) is None
    assert peer.not_applicable(Workload("m", 128, (100, 50), (4, 4)), 64) is None
    assert "speculative" in (peer.not_applicable(Workload("p", 16, (100, 50), (40, 30)), 64) or "")
    assert "speculative" in (peer.not_applicable(Workload("p", 16, (600,), (512,)), 64) or "")
    assert peer.not_applicable(Workload("d", 16, (100,), head_dim_ckv=256, head_dim_kpe=32), 64)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
@pytest.mark.parametrize("q_lens", [None, (2, 2, 2), (4, 4, 4)], ids=["decode", "mtp2", "mtp4"])
def test_flashmla_adapter_with_a_fake_module(q_lens: tuple[int, ...] | None, fused: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Block table, queries, KV lengths, causal flag and the lse conversion pass the bench's check; with
    the fused layout FlashMLA reads the very cache that ours reads through its two views."""
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "flash_mla", fake_flash_mla(calls))
    w = Workload("w", 4, (70, 5, 130), q_lens)  # partial pages (NaN past kv_last_page_len), three pages
    x = make_inputs(w, 64, torch.float32, seed=2, spare_pages=2, fused=fused)
    prepared = FlashMLAPeer().prepare(w, x, 64)
    out, lse = prepared.outputs()
    assert calls[0]["causal"] == (q_lens is not None) and not calls[0]["meta_filled"]
    assert (calls[0]["kv_ptr"] == x.ckv_cache.data_ptr()) == fused  # the same memory only when fused
    assert prepared.info["cache"].startswith("the inputs' fused" if fused else "own copy")
    ref_out, ref_lse = reference(w, x)
    passed, _, lse_err, why = bench_run.check_output(out, lse, ref_out, ref_lse)
    assert passed, why
    assert lse_err is not None and lse_err < 1e-4
    prepared.call()
    assert calls[1]["meta_filled"]  # the metadata object is filled once, then reused


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs SGLang's kernel under the interpreter")
def test_sglang_adapter_under_the_interpreter() -> None:
    """Only where the staged kernel is on the path (``PYTHONPATH=.peers/sglang``); CI has no copy."""
    pytest.importorskip("decode_attention")
    w = bench_rows.dry_run_set()[0]
    peer = SGLangPeer()
    assert peer.not_applicable(bench_rows.dry_run_set()[1], 1) == "decode kernel only"
    for page_size in (1, 64):
        x = make_inputs(w, page_size, torch.float16, seed=0)
        out, lse = peer.prepare(w, x, page_size).call()
        assert lse is None
        passed, rel, _, why = bench_run.check_output(out, None, *reference(w, x))
        assert passed, why


def test_dry_run_without_triton_interpret_in_the_environment(tmp_path: Path) -> None:
    """Started without TRITON_INTERPRET, the dry run restarts itself under the interpreter (Triton's helpers
    are made for compiled kernels when triton is imported): our kernels run and pass the reference check."""
    out = ok(mla_tune("--dry-run", "--rows", "dry-d-b3", "--page-size", "1", "--no-figure", "--out", str(tmp_path),
                      interpret=False))
    assert "DRY RUN" in out and "FAILED" not in out and "ERROR" not in out
