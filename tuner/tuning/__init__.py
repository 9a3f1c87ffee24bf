"""Tuning on the target GPU: the search space, the compile pool, the Optuna studies and their storage,
finalizing into the dispatch table, and the ``mla-tune tune`` / ``show`` commands. The only layer that
imports optuna."""
