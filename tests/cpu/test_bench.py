"""``mla-tune bench``: the dry run end to end (table, bench.json / bench.csv schema, figure or its
message, skipped peers, --compare, a shape of your own), the floor / ratio arithmetic, the reference
check, and the peer adapters that run without a GPU (PyTorch; SGLang's kernel under the interpreter
when its staged module is importable).

The command-line runs happen in a subprocess without CUDA (``CUDA_VISIBLE_DEVICES=""``): the dry run
switches the Triton interpreter on, which must not leak into a GPU test process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuner.bench import report as bench_report
from tuner.bench import rows as bench_rows
from tuner.bench import run as bench_run
from tuner.bench.peers import PEER_KEYS, SGLangPeer, TorchPeer, sglang_kv_splits, token_slots
from tuner.cli import main
from tuner.harness import floors
from tuner.harness.check import TOLERANCES
from tuner.harness.inputs import Workload, make_inputs
from tuner.harness.reference import kv_lengths, mla_decode_ref, mla_prefill_ref

REPO_ROOT = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def mla_tune(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tuner bench ...`` in a fresh interpreter that sees no GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
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
        (w.name, str(ps)) for w in bench_rows.dry_run_set() for ps in (1, 64)]
    for cols in lines:
        float(cols[2])  # ours was checked and timed on every row


def test_dry_run_reports_the_skipped_peers(dry_run: tuple[str, Path]) -> None:
    stdout, _ = dry_run
    for key in ("fa3", "fa2", "sglang"):
        assert stdout.count(f"skipped {key}: dry run: only the PyTorch peer runs") == 1  # once, not twice
    assert "wrote " in stdout


def test_dry_run_json_schema(dry_run: tuple[str, Path]) -> None:
    _, folder = dry_run
    doc = bench_report.load_results(folder / "bench.json")
    assert doc["dry_run"] is True and doc["note"] == bench_report.DRY_RUN_NOTE
    assert {"gpu", "gpu_key", "torch", "triton", "cuda", "date", "num_sms"} <= set(doc["env"])
    assert doc["env"]["gpu_key"] == "cpu-interpreter"
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    assert doc["settings"]["dtype"] == "float16" and doc["settings"]["page_sizes"] == [1, 64]
    assert list(doc["impls"]) == ["ours", "ours_fn", "ours_default", *PEER_KEYS]
    assert doc["impls"]["torch"]["available"] and not doc["impls"]["fa3"]["available"]
    assert len(doc["rows"]) == 2 * len(bench_rows.dry_run_set())
    for row in doc["rows"]:
        assert {"row", "kind", "heads", "batch", "total_q", "kv_tokens", "page_size", "bytes", "flops",
                "floor_us", "checked_seqs", "impls"} <= set(row)
        assert row["floor_us"] > 0 and row["checked_seqs"] == row["batch"]
        for key in ("ours", "ours_fn", "ours_default", "torch"):
            e = row["impls"][key]
            assert e["status"] == "ok", e
            assert e["median_us"] > 0 and e["method"] == "wall-clock" and e["runs"] == bench_run.DRY_RUN_RUNS
            assert e["rel_err"] < 1e-2 and e["lse_err"] <= TOLERANCES[torch.float16].lse
            assert e["floor_frac"] == pytest.approx(row["floor_us"] / e["median_us"], rel=1e-3)
        assert row["impls"]["torch"]["ours_over"] == pytest.approx(
            row["impls"]["ours"]["median_us"] / row["impls"]["torch"]["median_us"], rel=1e-3)
        kernel = f"mla_paged_{row['kind']}_h16_ckv512_kpe64_ps{row['page_size']}"
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
