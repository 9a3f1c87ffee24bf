"""The benchmark: its rows, the peer adapters, the run, the report and files, and ``mla-tune bench``."""
