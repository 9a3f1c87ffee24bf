"""FlashInfer-Bench export: the tuned dispatch as FlashInfer-Bench solutions, with definitions of the shapes
it does not publish and serving-like workloads, in its trace-set layout (``mla-tune export-fib``)."""
