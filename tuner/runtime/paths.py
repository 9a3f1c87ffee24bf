"""Every path and environment variable the package uses, in one place.

Environment variables:
    MLA_TUNER_GENERATED_DIR: where generated kernels and dispatch tables are read from (and written by
        ``mla-tune generate`` / ``mla-tune tune``). Default: the ``generated/`` folder of the checkout,
        or the copy installed inside the package.
    MLA_TUNER_CACHE_DIR: where tuning studies (the embedded Optuna journal) live.
        Default: ``$XDG_CACHE_HOME/mla-tuner`` or ``~/.cache/mla-tuner``.
    MLA_TUNER_GPU_KEY: overrides the GPU key used for dispatch lookups (tests use it).
    MLA_TUNER_VALIDATE: set to ``1`` (any value but empty or ``0``) to check the index data on the host
        in every call, as ``validate_data=True`` does: in ``mla_decode`` / ``mla_prefill`` and in
        ``MLADecode.plan`` / ``MLAPrefill.plan`` (even when given ``validate_data=False``). For an engine
        debugging a crash: out-of-range page ids, decreasing indptr, a bad ``kv_last_page_len`` or a
        ``qo_indptr[-1]`` that is not the query row count then raise a ValueError naming the argument
        before any launch. In the one-call forms that costs a device sync per call (so they can no longer be
        captured in a CUDA graph); ``run()`` is unchanged. Read on each call.

Read, not owned: TRITON_INTERPRET (Triton's own switch for its interpreter; where Triton has no
``triton.knobs``, the runtime reads it to accept float32 inputs only under the interpreter).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_GENERATED_DIR = "MLA_TUNER_GENERATED_DIR"
ENV_CACHE_DIR = "MLA_TUNER_CACHE_DIR"
ENV_GPU_KEY = "MLA_TUNER_GPU_KEY"
ENV_VALIDATE = "MLA_TUNER_VALIDATE"
ENV_TRITON_INTERPRET = "TRITON_INTERPRET"

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


def dry_run_dispatch_dir() -> Path:
    """Where ``mla-tune tune`` without a GPU (a dry run) writes its table: never read by the runtime."""
    return cache_dir() / "dry-run" / "dispatch"
