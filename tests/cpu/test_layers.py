"""The layers of ``tuner/`` and the direction of their imports, checked statically (every import
statement of every module, at module level or inside a function), and the perf probes kept importable.

    runtime  what a serving engine imports             imports: runtime (codegen only lazily, for
                                                                shapes outside the catalogue)
    codegen  renders templates/ (jinja2)               imports: runtime
    harness  inputs, reference, check, timing, floors  imports: runtime
    tuning   the Optuna search (the only optuna user)  imports: runtime, codegen, harness
    bench    ``mla-tune bench`` and the peers          imports: runtime, harness
    export   FlashInfer-Bench solutions, definitions,  imports: runtime, harness (its lognormal lengths)
             workloads (``mla-tune export-fib``)
    tuner/__init__.py, cli.py, __main__.py: the package's face and the command line, which may import
    any layer (the command line only inside its commands).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "tuner"
LAYERS = ("runtime", "codegen", "harness", "tuning", "bench", "export")
ALLOWED: dict[str, set[str]] = {
    "runtime": {"runtime", "codegen"},
    "codegen": {"codegen", "runtime"},
    "harness": {"harness", "runtime"},
    "tuning": {"tuning", "runtime", "codegen", "harness"},
    "bench": {"bench", "runtime", "harness"},
    "export": {"export", "runtime", "harness"},
    "top": set(LAYERS) | {"top"},
}
THIRD_PARTY_OWNER = {"optuna": {"tuning"}, "jinja2": {"codegen"}, "matplotlib": {"bench"},
                     "flashinfer_bench": {"export"}, "safetensors": {"export"}}
"""Heavy packages and the only layers that may import them."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "tuner":
        raise ValueError(module)
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, at module level) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or node.level and not node.module:
                found += [(node.lineno, f"{target}.{alias.name}", id(node) in top_level) for alias in node.names]
            else:
                found.append((node.lineno, target, id(node) in top_level))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_tree_shows_the_layers() -> None:
    for layer in LAYERS:
        init = PACKAGE / layer / "__init__.py"
        assert init.is_file(), f"tuner/{layer}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"tuner/{layer}/__init__.py: give the layer its one-line purpose"
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py", "cli.py"}]
    assert not loose, f"modules outside the layers: {loose}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = _layer(_module_name(path))
    wrong = []
    for line, target, top in _imports(path):
        root = target.split(".")[0]
        if root == "tuner":
            other = _layer(target)
            if other not in ALLOWED[layer]:
                wrong.append(f"line {line}: {target} ({layer} may not import {other})")
            elif layer == "runtime" and other == "codegen" and top:
                wrong.append(f"line {line}: {target} (the runtime imports codegen only inside a function)")
        elif root in THIRD_PARTY_OWNER and layer not in THIRD_PARTY_OWNER[root] | {"top"}:
            wrong.append(f"line {line}: {root} (only {', '.join(sorted(THIRD_PARTY_OWNER[root]))} may import it)")
    assert not wrong, f"{path.relative_to(REPO_ROOT)}:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: a relative import into another layer, at any depth, is resolved and caught."""
    fake = PACKAGE / "runtime" / "_fake_for_test.py"
    source = "def f():\n    from ..tuning import search\n    from tuner.bench.run import run_bench\n"
    tree_imports = []
    try:
        fake.write_text(source)
        tree_imports = _imports(fake)
    finally:
        fake.unlink()
    assert [(t, top) for _, t, top in tree_imports] == [("tuner.tuning", False), ("tuner.bench.run", False)]
    assert all(_layer(t) not in ALLOWED["runtime"] for _, t, _ in tree_imports)


def test_small_modules() -> None:
    """No module of the package and no template grows into an accretion point."""
    files = MODULES + sorted((REPO_ROOT / "templates").glob("*.jinja"))
    big = {str(p.relative_to(REPO_ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"over 450 lines: {big}"


PROBES = sorted((REPO_ROOT / "perf").glob("*.py"))


@pytest.mark.parametrize("path", PROBES, ids=lambda p: p.name)
def test_perf_probes_import(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes behind perf/LOG.md import against the current package (they run only on a GPU, under
    ``if __name__ == "__main__"``), so a refactor cannot leave them broken unseen."""
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.setattr(sys, "argv", [str(path)])
    spec = importlib.util.spec_from_file_location(f"_probe_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
