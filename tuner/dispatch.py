"""Runtime config selection: the tuned dispatch table when there is an entry, else the default.

(The table format, export and lookup rules live here; this first version has no tables yet and
always answers with the default configuration.)
"""

from __future__ import annotations

import torch

from .config import DecodeConfig, PrefillConfig, default_decode_config, default_prefill_config
from .device import gpu_info
from .spec import MLASpec


def decode_config(spec: MLASpec, batch: int, avg_kv_len: float, device: torch.device) -> DecodeConfig:
    """The config for a decode batch of ``batch`` requests of ``avg_kv_len`` tokens on average."""
    return default_decode_config(spec, batch, avg_kv_len, gpu_info(device).num_sms)


def prefill_config(spec: MLASpec, total_q: int, avg_kv_len: float, device: torch.device) -> PrefillConfig:
    return default_prefill_config(spec)
