"""The command line: ``mla-tune generate | tune | show | bench`` (also ``python -m tuner ...``).

``generate`` lives here; every other subcommand lives in its own light module ``tuner/cmd_<name>.py``
with ``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports (jinja2, optuna, matplotlib)
happen inside ``run``, never at import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tuner.runtime.spec import VARIANTS, MLASpec, catalogue


def _specs_from_args(args: argparse.Namespace) -> list[MLASpec] | None:
    """Specs named on the command line, or None for the whole catalogue."""
    if not any(getattr(args, a, None) for a in ("heads", "page_size", "ckv", "kpe", "variant")):
        return None
    variants = args.variant or list(VARIANTS)
    heads = args.heads or [16]
    page_sizes = args.page_size or [1, 64]
    return sorted({MLASpec(v, h, args.ckv or 512, args.kpe or 64, ps)
                   for v in variants for h in heads for ps in page_sizes})


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", type=int, nargs="+", help="query heads (default: 16)")
    p.add_argument("--page-size", type=int, nargs="+", help="page sizes (default: 1 64)")
    p.add_argument("--ckv", type=int, help="head_dim_ckv (default: 512)")
    p.add_argument("--kpe", type=int, help="head_dim_kpe (default: 64)")
    p.add_argument("--variant", choices=VARIANTS, nargs="+", help="kernel variants (default: all)")


def cmd_generate(args: argparse.Namespace) -> int:
    from tuner.codegen.render import generate

    specs = _specs_from_args(args)
    if specs is not None and not args.out:
        if args.check:
            specs = None  # --check always checks the committed catalogue
        else:
            print("generate: shapes outside the catalogue need --out DIR (generated/ holds the catalogue)",
                  file=sys.stderr)
            return 2
    from pathlib import Path

    out = Path(args.out) if args.out else None
    changed, diff = generate(out_dir=out, specs=specs, check=args.check, prune=specs is None)
    if args.check:
        if changed:
            sys.stdout.write(diff)
            print(f"generated/ is stale: {len(changed)} file(s) differ from the templates; "
                  "run `mla-tune generate`", file=sys.stderr)
            return 1
        print(f"generated/ is up to date ({len(specs or catalogue())} modules)")
        return 0
    print(f"generated {len(specs or catalogue())} modules; {len(changed)} file(s) written or removed")
    for name in changed:
        print(f"  {name}")
    return 0


SUBCOMMANDS = {
    "tune": ("tuner.tuning.command", "search launch parameters on this GPU and write the dispatch table"),
    "show": ("tuner.tuning.show", "print a kernel's generated module and its dispatch entries"),
    "bench": ("tuner.bench.command", "time the tuned dispatch against the peers on the benchmark set"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render the kernel catalogue into generated/")
    g.add_argument("--check", action="store_true", help="write nothing; print a diff and exit 1 if stale")
    g.add_argument("--out", help="render into this folder instead of generated/ (needed for custom shapes)")
    _add_shape_args(g)
    g.set_defaults(func=cmd_generate)

    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
