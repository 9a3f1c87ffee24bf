"""The installed layout: a wheel of this checkout carries the generated kernels inside the package
(``tuner/generated``), and the package finds and runs them from another folder, without templates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tuner import catalogue

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (the tree itself is left alone), unpacked as a
    site-packages folder."""
    pytest.importorskip("setuptools", minversion="69")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tuner", "generated"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("mla_tuner-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "site")
    return tmp / "site"


def test_wheel_carries_the_generated_catalogue(site: Path) -> None:
    generated = site / "tuner" / "generated"
    assert (generated / "__init__.py").is_file()
    shipped = {p.stem for p in generated.glob("mla_paged_*.py")}
    assert shipped == {spec.name() for spec in catalogue()}
    assert not (site / "templates").exists() and not (site / "generated").exists()
    assert (site / "tuner" / "cli.py").is_file()
    entry_points = next(site.glob("mla_tuner-*.dist-info")) / "entry_points.txt"
    assert "mla-tune = tuner.cli:main" in entry_points.read_text()


def test_installed_package_runs_from_another_folder(site: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLA_TUNER_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(TESTS_DIR)]), MLA_TUNER_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_INTERPRET="1")
    code = f"import helpers; helpers.check_installed({str(site)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed package OK" in proc.stdout
