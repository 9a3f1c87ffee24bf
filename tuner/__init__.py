"""mla-tuner: generated, autotuned Triton kernels for MLA attention over a paged KV cache.

Runtime API (importing it imports neither optuna nor jinja2):
    mla_decode(...), MLADecode: decode; mla_prefill(...), MLAPrefill: prefill.
    MLASpec: the specialization key and its canonical name.
"""

from __future__ import annotations

from tuner.runtime import __version__
from tuner.runtime.config import DecodeConfig, PrefillConfig
from tuner.runtime.decode import MLADecode, mla_decode
from tuner.runtime.prefill import MLAPrefill, mla_prefill
from tuner.runtime.spec import MLASpec, catalogue

__all__ = [
    "DecodeConfig", "MLADecode", "MLAPrefill", "MLASpec", "PrefillConfig", "catalogue", "mla_decode",
    "mla_prefill", "__version__",
]
