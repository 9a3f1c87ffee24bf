"""Generated MLA kernels: one module per specialization, named by ``tuner.runtime.spec.MLASpec.name()``.

Made by ``mla-tune generate`` from ``templates/``; ``mla-tune generate --check`` fails when a file here
differs from what the templates render. Do not edit by hand. ``dispatch/`` holds the tuned tables.
"""
