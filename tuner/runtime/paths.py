"""Every path and environment variable the package uses, in one place.

Environment variables:
    MLA_TUNER_GENERATED_DIR: where generated kernels and dispatch tables are read from (and written by
        ``mla-tune generate`` / ``mla-tune tune``). Default: the ``generated/`` folder of the checkout,
        or the copy installed inside the package.
    MLA_TUNER_CACHE_DIR: where tuning studies (the embedded Optuna journal) live.
        Default: ``$XDG_CACHE_HOME/mla-tuner`` or ``~/.cache/mla-tuner``.
    MLA_TUNER_GPU_KEY: overrides the GPU key used for dispatch lookups (tests use it).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_GENERATED_DIR = "MLA_TUNER_GENERATED_DIR"
ENV_CACHE_DIR = "MLA_TUNER_CACHE_DIR"
ENV_GPU_KEY = "MLA_TUNER_GPU_KEY"

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # tuner/
REPO_ROOT = PACKAGE_DIR.parent
TEMPLATES_DIR = REPO_ROOT / "templates"
GENERATED_MARKER = "__init__.py"
DISPATCH_SUBDIR = "dispatch"


def generated_dir() -> Path:
    """The folder of generated kernel modules.

    A checkout uses its top-level ``generated/``; a non-editable install finds the copy that
    ``pyproject.toml`` packages as ``tuner/generated``.
    """
    override = os.environ.get(ENV_GENERATED_DIR)
    if override:
        return Path(override)
    installed = PACKAGE_DIR / "generated"
    if (installed / GENERATED_MARKER).is_file():
        return installed
    return REPO_ROOT / "generated"


def templates_dir() -> Path:
    """The Jinja2 templates (only a checkout has them; they are not needed at run time)."""
    return TEMPLATES_DIR


def dispatch_dir() -> Path:
    """The tuned dispatch tables, one JSON file per GPU key, inside :func:`generated_dir`."""
    return generated_dir() / DISPATCH_SUBDIR


def results_dir() -> Path:
    """Where ``mla-tune bench`` writes ``<gpu-key>/bench.*`` by default: the checkout's committed
    ``results/`` folder, or ``./results`` outside a checkout."""
    return REPO_ROOT / "results" if TEMPLATES_DIR.is_dir() else Path.cwd() / "results"


def cache_dir() -> Path:
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mla-tuner"
