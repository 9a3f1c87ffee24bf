"""mla-tune: generated, autotuned Triton kernels for MLA attention over a paged KV cache.

Commands:
  generate    render the kernel catalogue (or shapes you name) from the templates
  tune        search the kernels' launch parameters on this GPU and write its dispatch table
  show        show the dispatch table this machine uses and the config each shape bucket gets
  bench       time the tuned kernels against FlashInfer, SGLang and PyTorch on the benchmark set
  export-fib  write the tuned dispatch as FlashInfer-Bench solutions (and definitions, workloads)

Examples:
  mla-tune tune                       # tune the default catalogue (16 heads, page sizes 1 and 64)
  mla-tune tune --model deepseek-v3-tp1 --variant decode
  mla-tune show mla_paged_decode_h16_ckv512_kpe64_ps64
  mla-tune bench --rows d-b1-1k d-b32-4k
  mla-tune generate --check           # exit 1 when generated/ differs from the templates
  mla-tune export-fib /tmp/fib --public

`mla-tune COMMAND --help` describes each command and its options. Also: python -m tuner ...
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
    "show": ("tuner.tuning.show", "show the dispatch table this machine uses and each bucket's config"),
    "bench": ("tuner.bench.command", "time the tuned kernels against the peers on the benchmark set"),
    "export-fib": ("tuner.export.command", "write FlashInfer-Bench solutions (and definitions, workloads) "
                                           "for the tuned dispatch"),
}
"""Each command's module has add_arguments(parser) and run(args); heavy imports happen inside run."""

GENERATE_HELP = """Render the templates into one Triton module per specialization.

With no shape options: the built-in catalogue into generated/ (only files whose content changes are
written; modules no longer in the catalogue are removed). With shape options and --out DIR: those
shapes into DIR (a shape outside the catalogue is also rendered on first use by the runtime, into the
cache folder).

Examples:
  mla-tune generate
  mla-tune generate --check                       # CI: print a diff and exit 1 when stale
  mla-tune generate --heads 24 --page-size 16 --variant decode --out /tmp/kernels
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render the kernel catalogue into generated/", description=GENERATE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--check", action="store_true", help="write nothing; print a diff and exit 1 if stale")
    g.add_argument("--out", help="render into this folder instead of generated/ (needed for custom shapes)")
    _add_shape_args(g)
    g.set_defaults(func=cmd_generate)

    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
