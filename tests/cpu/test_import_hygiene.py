"""Importing and running the runtime imports neither optuna nor jinja2 (nor matplotlib), and the
command line's subcommand modules import nothing heavy until they run. Checked in fresh interpreters
that import this checkout's package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("optuna", "jinja2", "matplotlib")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    prologue = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import tuner
        from pathlib import Path
        assert Path(tuner.__file__).resolve().parent == Path({str(REPO_ROOT / 'tuner')!r}), tuner.__file__
        HEAVY = {HEAVY!r}
        def check(where):
            loaded = [m for m in HEAVY if m in sys.modules]
            assert not loaded, f"{{where}} imported {{loaded}}"
    """)
    return subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_runtime_import_and_calls_stay_light() -> None:
    proc = run_python("""
        check("import tuner")
        for name in tuner.__all__:
            getattr(tuner, name)
        import pkgutil, importlib, tuner.runtime
        for m in pkgutil.iter_modules(tuner.runtime.__path__):
            importlib.import_module(f'tuner.runtime.{m.name}')
        import tuner.harness.reference, tuner.harness.timing, tuner.harness.inputs
        check("the runtime modules")
        import torch
        from tuner.harness.inputs import Workload, make_inputs
        for w in (Workload("d", 16, (5, 20)), Workload("p", 16, (5, 20), (2, 3))):
            x = make_inputs(w, 16, torch.float32, seed=0)
            if w.is_decode:
                tuner.mla_decode(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.kv_indptr, x.kv_indices,
                                 x.sm_scale, x.kv_last_page_len)
                tuner.MLADecode().plan(x.kv_indptr, x.kv_indices, x.kv_last_page_len, num_heads=16,
                                       page_size=16, sm_scale=x.sm_scale).run(
                    x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache)
            else:
                tuner.mla_prefill(x.q_nope, x.q_pe, x.ckv_cache, x.kpe_cache, x.qo_indptr, x.kv_indptr,
                                  x.kv_indices, x.sm_scale, x.kv_last_page_len)
        check("decode and prefill calls")
        print("ok")
    """)
    assert_ok(proc)
    assert proc.stdout.strip().endswith("ok")


def test_cli_parser_stays_light() -> None:
    """Building the parser imports every tuner/cmd_*.py: none may import a heavy package at import."""
    proc = run_python("""
        import tuner.cli
        parser = tuner.cli.build_parser()
        check("building the mla-tune parser")
        parser.parse_args(["generate", "--check"])
        print("ok")
    """)
    assert_ok(proc)


def test_generate_is_where_jinja2_comes_in() -> None:
    """The one place that imports jinja2 is code generation (so the check above is not vacuous)."""
    proc = run_python("""
        from tuner.codegen import render as codegen
        check("import tuner.codegen")
        codegen.render(tuner.MLASpec("decode", 16, 512, 64, 1))
        assert "jinja2" in sys.modules
        print("ok")
    """)
    assert_ok(proc)
