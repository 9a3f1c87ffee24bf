"""Test setup shared by tests/cpu and tests/gpu.

Without CUDA the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set here,
before anything imports triton. Tests marked ``gpu`` are skipped without CUDA; tests marked
``postgres`` are skipped unless ``MLA_TUNER_TEST_PG_URL`` names a server.

The checkout's own package is put first on ``sys.path`` so that the tests exercise it even where a
copy of the package is installed (CI installs one to check the installed layout).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
PG_URL_ENV = "MLA_TUNER_TEST_PG_URL"

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _path in (str(TESTS_DIR), str(REPO_ROOT)):  # REPO_ROOT ends up first: `import tuner` is the checkout's
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


def pytest_configure(config: pytest.Config) -> None:
    # The Triton interpreter converts 1-element arrays to scalars, which NumPy deprecates: noise only.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_pg = pytest.mark.skip(reason=f"needs a PostgreSQL server: set {PG_URL_ENV}")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "postgres" in item.keywords and not os.environ.get(PG_URL_ENV):
            item.add_marker(skip_pg)
