"""``mla-tune export-fib``: FlashInfer-Bench solutions, definitions and workloads of the tuned dispatch.

What FlashInfer-Bench (flashinfer-bench 0.1.2) needs, checked on the CPU: its data model loads everything
written; mla-tuner's definitions of the six public names have FlashInfer-Bench's interface (the vendored
copies in tests/data/fib/); each solution's ``run`` takes the definition's inputs in order, then its outputs,
and computes the operation (the generated kernels under the Triton interpreter, fp16) as the float32
reference of ``tuner.harness`` and the definition's own reference code do; FlashInfer-Bench's builder accepts
it; the workloads have no empty sequence and only causal rows that see a token.

The tests that need FlashInfer-Bench's data model skip where ``flashinfer_bench`` is not installed; CI installs
it (``.ci/run``: ``pip install --no-deps flashinfer-bench==0.1.2``, with pydantic, safetensors and
docstring-parser from the ``[test]`` extra).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import Case, check, make_case

from tuner.cli import main as cli_main
from tuner.export.definitions import FIB_PUBLIC, OUTPUTS, definition, differences, input_names
from tuner.export.solutions import choose_table, flashinfer_solution, main_source, solution
from tuner.export.summary import summarize
from tuner.export.workloads import Shape, write_workloads
from tuner.harness.check import TOLERANCES
from tuner.harness.inputs import SM_SCALE
from tuner.runtime.spec import MLASpec, catalogue

FIB_DATA = Path(__file__).resolve().parents[1] / "data" / "fib"
PUBLIC = [MLASpec.from_name(name) for name in FIB_PUBLIC]
OTHERS = [MLASpec.from_name(name) for name in ("mla_paged_decode_h32_ckv512_kpe64_ps16",
                                                "mla_paged_prefill_h16_ckv512_kpe64_ps1",
                                                "mla_paged_prefill_causal_h16_ckv256_kpe32_ps64")]
NO_FIB = ("flashinfer_bench is not installed: pip install --no-deps flashinfer-bench==0.1.2 (its data model "
          "needs pydantic, safetensors and docstring-parser, which the [test] extra brings); CI installs it")

EXPORTED = [s for s in catalogue() if not s.fp8]
"""What the export writes: FlashInfer-Bench's MLA definitions have no cache scales (no fp8 kernels)."""


def fib() -> ModuleType:
    """FlashInfer-Bench's data model (skips the test where it is not installed)."""
    pytest.importorskip("flashinfer_bench.data", reason=NO_FIB)
    import flashinfer_bench

    return flashinfer_bench


def _fib_definition(name: str) -> dict[str, Any]:
    return json.loads((FIB_DATA / f"{name}.json").read_text())


def _module(source: str, tmp_path: Path, name: str) -> ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vendored_definitions_are_the_six_public_ones() -> None:
    assert sorted(p.stem for p in FIB_DATA.glob("*.json")) == sorted(FIB_PUBLIC)
    assert {s.name() for s in PUBLIC} <= {s.name() for s in catalogue()}


@pytest.mark.parametrize("spec", PUBLIC, ids=str)
def test_our_definition_has_fib_interface(spec: MLASpec) -> None:
    """Name, axes (kind, value, order), inputs and outputs (order, shapes, dtypes) equal FlashInfer-Bench's."""
    theirs = _fib_definition(spec.name())
    assert differences(definition(spec), theirs) == []
    assert list(theirs["inputs"]) == list(input_names(spec))
    assert list(theirs["outputs"]) == list(OUTPUTS)


def test_differences_name_what_differs() -> None:
    theirs = _fib_definition(FIB_PUBLIC[1])
    theirs["inputs"] = dict(reversed(list(theirs["inputs"].items())))
    theirs["axes"]["page_size"]["value"] = 32
    found = differences(definition(MLASpec.from_name(FIB_PUBLIC[1])), theirs)
    assert [d.split(":")[0] for d in found] == ["axes", "inputs"]


@pytest.mark.parametrize("spec", EXPORTED, ids=str)
def test_run_takes_the_definitions_inputs_then_outputs(spec: MLASpec, tmp_path: Path) -> None:
    """Exactly the definition's inputs in its order, then output and lse: no defaults, nothing more (the
    harness counts the parameters); kv_last_page_len before sm_scale wherever the definition has it."""
    run = _module(main_source(spec), tmp_path, "main").run
    params = inspect.signature(run).parameters
    assert list(params) == list(definition(spec)["inputs"]) + list(definition(spec)["outputs"])
    assert all(p.default is inspect.Parameter.empty for p in params.values())
    fi = ast.parse(flashinfer_solution(spec)["sources"][0]["content"])
    (fi_run,) = [node for node in fi.body if isinstance(node, ast.FunctionDef) and node.name == "run"]
    assert [a.arg for a in fi_run.args.args] == list(params) and not fi_run.args.defaults


def _case(spec: MLASpec, seed: int = 0) -> Case:
    """A small fp16 batch with partial last pages, scattered pages, a fresh prompt and a chunk after a prefix."""
    ps = spec.page_size
    kv_lens = [1, ps + 5, 2 * ps + 3] if ps > 1 else [1, 37, 70]
    q_lens = None if spec.is_decode else [1, 4, 3]
    return make_case(spec.num_heads, kv_lens, q_lens, page_size=ps, ckv=spec.head_dim_ckv, kpe=spec.head_dim_kpe,
                     dtype=torch.float16, seed=seed)


def _arguments(spec: MLASpec, case: Case) -> list[Any]:
    """The definition's inputs, by name and in its order, from a case."""
    return [getattr(case, name) for name in input_names(spec)]


def _reference(spec: MLASpec, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return case.decode_ref() if spec.is_decode else case.prefill_ref(causal=spec.causal)


@pytest.mark.parametrize("spec", PUBLIC + OTHERS, ids=str)
def test_solution_computes_the_operation(spec: MLASpec, tmp_path: Path) -> None:
    """The solution's run (destination-passing) under the Triton interpreter against tuner.harness's float32
    reference; the definition's reference code (FlashInfer-Bench's for the public names, else mla-tuner's)
    on the same inputs against it too."""
    case = _case(spec)
    run = _module(main_source(spec), tmp_path, "main").run
    rows, heads = case.q_nope.shape[:2]
    output = torch.full((rows, heads, spec.head_dim_ckv), float("nan"), dtype=torch.float16)
    lse = torch.full((rows, heads), float("nan"), dtype=torch.float32)
    assert run(*_arguments(spec, case), output, lse) is None
    ref_out, ref_lse = _reference(spec, case)
    verdict = check(output, lse, ref_out, ref_lse)
    assert verdict.passed, verdict.reason

    code = _fib_definition(spec.name())["reference"] if spec.name() in FIB_PUBLIC else definition(spec)["reference"]
    def_out, def_lse = _module(code, tmp_path, "reference").run(*_arguments(spec, case))
    assert def_lse.dtype == torch.float32 and def_out.shape == output.shape
    verdict = check(def_out, def_lse, ref_out, ref_lse)  # by the output's dtype: bf16 for FlashInfer-Bench's
    assert verdict.passed, f"the definition's reference: {verdict.reason}"


@pytest.mark.parametrize("spec", PUBLIC, ids=str)
def test_our_reference_equals_fibs(spec: MLASpec, tmp_path: Path) -> None:
    """mla-tuner's reference code for a public name, run on the same inputs as FlashInfer-Bench's, gives the
    same lse and (bf16 queries in, so bf16 out) outputs within bf16 rounding."""
    case = _case(spec, seed=3)
    args = [a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _arguments(spec, case)]
    ours = _module(definition(spec)["reference"], tmp_path, "ours").run(*args)
    theirs = _module(_fib_definition(spec.name())["reference"], tmp_path, "theirs").run(*args)
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), atol=1e-2, rtol=1e-2)


def test_definitions_and_solutions_validate_with_fib_model() -> None:
    """Every catalogue spec: mla-tuner's definition, its solution and the FlashInfer one load with
    FlashInfer-Bench's pydantic model; the description names the version, the table's GPU and hash."""
    model = fib()
    table = choose_table("nvidia-h200")
    for spec in EXPORTED:
        parsed = model.Definition.model_validate(definition(spec))
        assert list(parsed.inputs) == list(input_names(spec)) and parsed.const_axes["page_size"] == spec.page_size
        ours = model.Solution.model_validate(solution(spec, table))
        assert ours.spec.language == "triton" and ours.spec.entry_point == "main.py::run"
        assert ours.spec.destination_passing_style and ours.definition == spec.name()
        assert ours.name == f"mla-tuner_{spec.name()}"
        assert all(word in ours.description for word in ("mla-tuner 0.1.0", "NVIDIA H200", table.sha256[:16]))
        model.Solution.model_validate(flashinfer_solution(spec))


@pytest.mark.parametrize("spec", PUBLIC, ids=str)
def test_fib_builder_accepts_and_runs_the_solution(spec: MLASpec, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashInfer-Bench's own path on the CPU: its Triton builder imports the solution and checks its
    signature, its workload loader reads a workload of ours (blob and all), and the solution's result on those
    inputs (fp16 here: the interpreter has no bf16 dot) matches the definition's reference run by its builder."""
    fib()
    from flashinfer_bench.bench.utils import gen_inputs, load_safetensors
    from flashinfer_bench.compile import BuilderRegistry
    from flashinfer_bench.data import Definition, Solution, Workload

    monkeypatch.setenv("FIB_CACHE_PATH", str(tmp_path / "cache"))
    theirs = Definition.model_validate(_fib_definition(spec.name()))
    trace = write_workloads(tmp_path, spec, _fib_definition(spec.name()), 1,
                            shapes=(Shape(3, kv=40, q=2, prefix=20),))[0]
    workload = Workload.model_validate(trace["workload"])
    inputs = gen_inputs(theirs, workload, "cpu", load_safetensors(theirs, workload, tmp_path))
    inputs = [x.half() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    registry = BuilderRegistry.get_instance()
    runnable = registry.build(theirs, Solution.model_validate(solution(spec, choose_table("nvidia-h200"))))
    assert runnable.metadata.build_type == "triton" and runnable.metadata.destination_passing_style
    rows = inputs[0].shape[0]
    output = torch.empty(rows, spec.num_heads, spec.head_dim_ckv, dtype=torch.float16)
    lse = torch.empty(rows, spec.num_heads, dtype=torch.float32)
    runnable(*inputs, output, lse)
    ref_out, ref_lse = registry.build_reference(theirs)(*inputs)
    verdict = check(output, lse, ref_out.float(), ref_lse, TOLERANCES[torch.bfloat16])
    assert verdict.passed, verdict.reason


def _export(tmp_path: Path, *args: str) -> int:
    return cli_main(["export-fib", str(tmp_path), "--gpu", "nvidia-h200", *args])


def test_export_writes_every_catalogue_solution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fib()
    assert _export(tmp_path) == 0
    trace_set = model.TraceSet.from_path(str(tmp_path))
    served = {s.name() for s in EXPORTED}
    assert set(trace_set.solutions) == served and all(len(s) == 1 for s in trace_set.solutions.values())
    assert set(trace_set.definitions) == served - set(FIB_PUBLIC)  # FlashInfer-Bench has the public ones
    report = capsys.readouterr().out
    assert "loaded back with flashinfer-bench 0.1.2's data model: 60 definitions, 66 solutions" in report


def test_export_filters_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _export(tmp_path / "a", "--heads", "128", "--variant", "decode", "--page-size", "1") == 0
    assert sorted(p.name for p in (tmp_path / "a").rglob("*.json")) == [
        "mla-tuner_mla_paged_decode_h128_ckv512_kpe64_ps1.json", "mla_paged_decode_h128_ckv512_kpe64_ps1.json"]
    assert _export(tmp_path / "b", "--heads", "24") == 2
    assert "no catalogue spec matches" in capsys.readouterr().err
    assert cli_main(["export-fib", str(tmp_path / "c"), "--gpu", "no-such-gpu"]) == 2
    assert "no dispatch table" in capsys.readouterr().err
    changed = tmp_path / "changed"
    changed.mkdir()
    data = _fib_definition(FIB_PUBLIC[0])
    data["inputs"]["sm_scale"]["dtype"] = "float16"
    (changed / "d.json").write_text(json.dumps(data))
    assert _export(tmp_path / "d", "--public", "--fib-definitions", str(changed)) == 2
    assert f"{FIB_PUBLIC[0]} differs from mla-tuner's: inputs" in capsys.readouterr().err


def test_trace_set_workloads(tmp_path: Path) -> None:
    """The trace set of the six: FlashInfer-Bench's definitions (checked), its model loads every workload and
    its loader reads every blob at the definition's shapes; no empty sequence, q_len <= kv_len, pages unique
    and in the cache, partial last pages in range, sm_scale the definitions' 1/sqrt(192)."""
    fib()
    from flashinfer_bench.bench.utils import load_safetensors

    assert _export(tmp_path, "--public", "--workloads", "3", "--fib-definitions", str(FIB_DATA),
                   "--with-flashinfer") == 0
    trace_set = __import__("flashinfer_bench").TraceSet.from_path(str(tmp_path))
    assert sorted(trace_set.definitions) == sorted(FIB_PUBLIC)
    for name, defn in trace_set.definitions.items():
        assert defn.model_dump(mode="json", exclude_unset=True) == _fib_definition(name)
        assert sorted(s.name for s in trace_set.solutions[name]) == [f"flashinfer_{name}", f"mla-tuner_{name}"]
        assert len(trace_set.workloads[name]) == 3
        for trace in trace_set.workloads[name]:
            w = trace.workload
            assert {k for k, v in w.inputs.items() if v.type == "random"} == {"q_nope", "q_pe", "ckv_cache",
                                                                             "kpe_cache"}
            assert w.inputs["sm_scale"].type == "scalar" and w.inputs["sm_scale"].value == SM_SCALE
            assert math.isclose(SM_SCALE, 1 / math.sqrt(192))
            blob = load_safetensors(defn, w, tmp_path)
            pages = blob["kv_indptr"].diff()
            assert int(blob["kv_indptr"][0]) == 0 and bool((pages > 0).all()), "an empty sequence"
            indices = blob["kv_indices"]
            assert indices.unique().numel() == indices.numel() and int(indices.max()) < w.axes["num_pages"]
            ps = defn.const_axes["page_size"]
            last = blob.get("kv_last_page_len", torch.full_like(pages, ps))
            assert bool(((last >= 1) & (last <= ps)).all())
            kv_len = (pages - 1) * ps + last
            if "qo_indptr" in blob:
                q_len = blob["qo_indptr"].diff()
                assert bool((q_len >= 1).all()) and bool((q_len <= kv_len).all()), "a causal row that sees nothing"


def test_summary_of_a_run(tmp_path: Path) -> None:
    """The table perf/fib_run.sh prints last, from traces in FlashInfer-Bench's format."""
    model = fib()
    env = {"hardware": "NVIDIA H200", "libs": {}}

    def trace(solution: str, status: str, latency_ms: float | None) -> dict[str, Any]:
        evaluation: dict[str, Any] = {"status": status, "environment": env, "timestamp": "t", "log": ""}
        if latency_ms is not None:
            evaluation["correctness"] = {"max_relative_error": 0.01, "max_absolute_error": 0.001}
            evaluation["performance"] = {"latency_ms": latency_ms, "reference_latency_ms": 10.0,
                                         "speedup_factor": 10.0 / latency_ms}
        data = {"definition": FIB_PUBLIC[0], "solution": solution, "evaluation": evaluation,
                "workload": {"axes": {"batch_size": 16, "num_kv_indices": 900}, "inputs": {}, "uuid": "w1"}}
        return model.Trace.model_validate(data).model_dump(mode="json")

    folder = tmp_path / "traces" / "mla_paged"
    folder.mkdir(parents=True)
    rows = [trace(f"mla-tuner_{FIB_PUBLIC[0]}", "PASSED", 0.02), trace(f"flashinfer_{FIB_PUBLIC[0]}", "PASSED", 0.05)]
    (folder / f"{FIB_PUBLIC[0]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines, ok = summarize(tmp_path)
    assert ok
    row = next(line for line in lines if line.startswith(FIB_PUBLIC[0]))
    assert "B=16 pages=900" in row and "20.0" in row and "500" in row and "2.50" in row
    assert lines[-1].startswith("ours passed 1 of 1 workloads")
    rows[0] = trace(f"mla-tuner_{FIB_PUBLIC[0]}", "RUNTIME_ERROR", None)
    (folder / f"{FIB_PUBLIC[0]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert summarize(tmp_path)[1] is False
