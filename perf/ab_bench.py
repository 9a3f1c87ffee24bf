"""A/B of a kernel change before its re-tune: `mla-tune bench` (same arguments) with the dispatch table's
entries used even where the generated module changed since they were tuned (their configs are still
valid), so that both sides run the same configs. Run once per side, e.g. the committed modules before
the change (MLA_TUNER_GENERATED_DIR=build/old/generated, from `git archive OLD generated`) and these:

    MLA_TUNER_GENERATED_DIR=build/old/generated python3 perf/ab_bench.py --peers fa3 --out /tmp/old
    python3 perf/ab_bench.py --peers fa3 --out /tmp/new

Development tool for perf/LOG.md (gpu_session.sh's `abbench` phase); the product's benchmark is
`mla-tune bench`.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stage_probe import use_stale_entries

    from tuner.cli import main as cli_main

    use_stale_entries()
    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
