"""Compile ahead of `flashinfer-bench run`: call solutions of one definition of an exported trace set once on
each of its workloads, through FlashInfer-Bench's own builder and input generator, so that Triton's and
FlashInfer's on-disk caches already hold every kernel when the harness's worker process starts timing.
perf/fib_run.sh runs one of these per definition at the same time. GPU only; one line per call.

Usage: python3 perf/fib_warm.py DIR DEFINITION [SOLUTION ...]   (default: every solution of DEFINITION)
Exit status 1 if a call failed (the harness then reports it too).
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    from flashinfer_bench.bench.evaluators.utils import allocate_outputs
    from flashinfer_bench.bench.utils import gen_inputs, load_safetensors
    from flashinfer_bench.compile import BuilderRegistry
    from flashinfer_bench.data import TraceSet

    root, name, *wanted = argv
    trace_set = TraceSet.from_path(root)
    definition = trace_set.definitions[name]
    solutions = [s for s in trace_set.solutions.get(name, []) if not wanted or s.name in wanted]
    registry = BuilderRegistry.get_instance()
    failed = 0
    for trace in trace_set.workloads.get(name, []):
        workload = trace.workload
        inputs = gen_inputs(definition, workload, "cuda:0", load_safetensors(definition, workload, trace_set.root))
        for solution in solutions:
            t0 = time.time()
            try:
                registry.build(definition, solution)(*inputs, *allocate_outputs(definition, inputs, "cuda:0"))
                torch.cuda.synchronize()
                status = "ok"
            except Exception as err:  # noqa: BLE001 - reported, and the harness reports it again
                failed += 1
                status = f"FAILED: {type(err).__name__}: {err}"
            print(f"{solution.name} workload {workload.uuid[:8]}: {time.time() - t0:.1f} s {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
