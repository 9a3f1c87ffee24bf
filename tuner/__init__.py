"""mla-tuner: generated, autotuned Triton kernels for MLA attention over a paged KV cache.

Runtime API (importing it imports neither optuna nor jinja2):
    mla_decode(...), MLADecode: decode; mla_prefill(...), MLAPrefill: prefill.
    MLASpec: the specialization key and its canonical name.
"""

from __future__ import annotations

from .config import DecodeConfig, PrefillConfig
from .decode import MLADecode, mla_decode
from .prefill import MLAPrefill, mla_prefill
from .spec import MLASpec, catalogue

__all__ = [
    "DecodeConfig", "MLADecode", "MLAPrefill", "MLASpec", "PrefillConfig", "catalogue", "mla_decode",
    "mla_prefill",
]
__version__ = "0.1.0"
