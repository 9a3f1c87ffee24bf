"""Find and import the generated module of a specialization (cached per process).

Catalogue modules come from ``generated/``. A shape outside the catalogue (another head count, say)
is rendered on first use into the cache folder, which needs jinja2 and the templates of a checkout;
the error says how to generate it otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

from . import paths
from .fileio import source_hash
from .spec import MLASpec


def module_path(spec: MLASpec) -> Path:
    """Where the module of ``spec`` is: generated/ first, else rendered on demand into the cache."""
    name = f"{spec.name()}.py"
    shipped = paths.generated_dir() / name
    if shipped.is_file():
        return shipped
    if not (paths.templates_dir() / spec.template).is_file():
        raise FileNotFoundError(
            f"no generated module for {spec.name()} in {paths.generated_dir()} and no templates to "
            f"render it from; run `mla-tune generate --heads {spec.num_heads} --ckv {spec.head_dim_ckv} "
            f"--kpe {spec.head_dim_kpe} --page-size {spec.page_size}` in a checkout"
        )
    # Keyed by the templates' content: a module rendered by other templates is never picked up.
    cached = paths.cache_dir() / "generated" / _templates_hash() / name
    if not cached.is_file():
        try:
            from tuner.codegen.render import render  # imports jinja2: only for shapes outside the catalogue
        except ImportError as err:
            raise ImportError(f"{spec.name()} is outside the catalogue and is rendered on first use, which needs "
                              f"jinja2 ({err}): install the package with its [tune] extra, e.g. "
                              "pip install '.[tune]'") from err

        from .fileio import write_atomic

        write_atomic(cached, render(spec))
    return cached


@functools.cache
def _templates_hash() -> str:
    folder = paths.templates_dir()
    return source_hash("".join(f"{p.name}\0{p.read_text()}\0" for p in sorted(folder.glob("*.jinja"))))


@functools.cache
def load_module(spec: MLASpec) -> ModuleType:
    """Import the generated module of ``spec``; its ``launch()`` runs the kernels."""
    path = module_path(spec)
    mod_name = f"tuner._kernels.{spec.name()}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import generated module {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # Triton's JIT looks its functions' source up through the module
    module_spec.loader.exec_module(module)
    if getattr(module, "NAME", None) != spec.name():
        raise ImportError(f"{path}: expected NAME = {spec.name()!r}, found {getattr(module, 'NAME', None)!r}")
    if getattr(module, "GLUON_ERROR", None):
        _warn_gluon(module.GLUON_ERROR)
    from .launch import make_recordable  # launch imports this module

    make_recordable(module)
    return module


@functools.cache
def _warn_gluon(error: str) -> None:
    """Once per process: this Triton's Gluon lacks the Hopper API the warp-specialized kernels use."""
    import triton

    warnings.warn(f"Gluon's Hopper API is unavailable in triton {triton.__version__} ({error}): the Triton "
                  "kernels run every config (the supported range is triton 3.6 to 3.9)", RuntimeWarning,
                  stacklevel=3)


@functools.cache
def module_hash(spec: MLASpec) -> str:
    """Hash of the generated module's source (dispatch entries are stamped with it)."""
    return source_hash(module_path(spec).read_text())
