"""Code generation: render one Triton module per specialization from the Jinja2 templates.

Only the ``generate`` command (and the on-demand rendering of shapes outside the catalogue) imports
this module; it is the only place jinja2 is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from tuner.runtime import paths
from tuner.runtime.config import ws_block_h, ws_capable, ws_narrow
from tuner.runtime.device import H100_SHARED_BYTES
from tuner.runtime.fileio import write_atomic
from tuner.runtime.spec import MLASpec, catalogue

GENERATED_INIT = '''\
"""Generated MLA kernels: one module per specialization, named by ``tuner.runtime.spec.MLASpec.name()``.

Made by ``mla-tune generate`` from ``templates/``; ``mla-tune generate --check`` fails when a file here
differs from what the templates render. Do not edit by hand. ``dispatch/`` holds the tuned tables.
"""
'''


def _environment(templates_dir: Path):  # -> jinja2.Environment
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(spec: MLASpec, templates_dir: Path | None = None) -> str:
    """The source of the generated module for ``spec`` (deterministic: same inputs, same bytes)."""
    templates_dir = templates_dir or paths.templates_dir()
    if not (templates_dir / spec.template).is_file():
        raise FileNotFoundError(f"templates: {templates_dir / spec.template} not found; code generation needs a "
                                "checkout of mla-tuner (an installed package ships generated kernels, not templates)")
    env = _environment(templates_dir)
    context = dict(asdict(spec), name=spec.name(), causal=spec.causal, ws=ws_capable(spec),
                   ws_block_h=ws_block_h(spec), ws_narrow=ws_narrow(spec), hopper_shared_bytes=H100_SHARED_BYTES)
    source = env.get_template(spec.template).render(**context)
    return source.rstrip("\n") + "\n"


def module_filename(spec: MLASpec) -> str:
    return f"{spec.name()}.py"


def expected_files(specs: Iterable[MLASpec]) -> dict[str, str]:
    """File name (relative to ``generated/``) -> content, for the given specs plus the package marker."""
    files = {paths.GENERATED_MARKER: GENERATED_INIT}
    for spec in specs:
        files[module_filename(spec)] = render(spec)
    return files


def _stale(out_dir: Path, files: dict[str, str]) -> tuple[dict[str, str | None], list[str]]:
    """Files whose content differs (name -> current content or None) and orphan kernel modules."""
    changed: dict[str, str | None] = {}
    for rel, content in files.items():
        path = out_dir / rel
        current = path.read_text() if path.is_file() else None
        if current != content:
            changed[rel] = current
    orphans = sorted(
        p.name for p in out_dir.glob("mla_paged_*.py") if p.name not in files
    ) if out_dir.is_dir() else []
    return changed, orphans


def generate(out_dir: Path | None = None, specs: Iterable[MLASpec] | None = None,
             check: bool = False, prune: bool = True) -> tuple[list[str], str]:
    """Render ``specs`` (default: the catalogue) into ``out_dir`` (default: ``generated/``).

    Writes only files whose content changed (atomically), and with ``prune`` removes kernel modules
    no longer in the catalogue. With ``check``, writes nothing and returns the unified diff instead.

    Returns (the names of the files that differ or would differ, the diff text when ``check``).
    """
    out_dir = out_dir or paths.generated_dir()
    files = expected_files(specs if specs is not None else catalogue())
    changed, orphans = _stale(out_dir, files)
    names = sorted(changed) + [f"{o} (not in the catalogue)" for o in orphans if prune]
    if check:
        diff = []
        for rel, current in sorted(changed.items()):
            diff += difflib.unified_diff(
                (current or "").splitlines(keepends=True), files[rel].splitlines(keepends=True),
                fromfile=f"generated/{rel}" if current is not None else "/dev/null",
                tofile=f"generated/{rel} (rendered)",
            )
        if prune:
            diff += [f"orphan: generated/{o} is not rendered by any catalogue spec\n" for o in orphans]
        return names, "".join(diff)
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in changed:
        write_atomic(out_dir / rel, files[rel])
    if prune:
        for orphan in orphans:
            (out_dir / orphan).unlink()
    return names, ""
