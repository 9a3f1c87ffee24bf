"""The dispatch table: tuned configs per GPU, kernel and shape bucket, and the runtime lookup.

Files: ``generated/dispatch/<gpu key>.json``, one per GPU model, written by ``mla-tune tune`` (the
export step distills its Optuna studies into entries and merges them into the file: tuning one GPU
never touches another GPU's file, and tuning some kernels or buckets keeps every other entry).
JSON with sorted keys, written atomically::

    {
      "schema_version": 1,
      "gpu": {"capability": "9.0", "key": "nvidia-h100-80gb-hbm3", "name": "NVIDIA H100 80GB HBM3",
              "num_sms": 132},
      "kernels": {
        "mla_paged_decode_h16_ckv512_kpe64_ps1": {
          "b1-16_kv1-2k": {
            "config": {"block_h": 16, "block_n": 64, ...},   # DecodeConfig / PrefillConfig fields
            "default_time_us": 21.3,  # the default config, re-timed beside the winner (null: it failed)
            "kernel_hash": "1f0c...", # tuner.runtime.loader.module_hash of the generated module tuned
            "time_us": 17.9,          # the winner: median of a CUDA-graph replay, L2 flushed
            "trials": 24,             # candidates measured
            "versions": {"cuda": "12.8", "torch": "2.11.0", "triton": "3.6.0"}
          }
        }
      }
    }

Lookup (``decode_config`` / ``prefill_config``, called by ``plan()`` and on every call of the
functional forms): the bucket of the batch (:mod:`tuner.runtime.buckets`), then the entry of this exact GPU,
else the entry of a GPU with the same compute capability (same multiprocessor count first), else a config
derived from the entry of the nearest tuned shape in those tables (:mod:`tuner.runtime.derive`), else the
default config. An entry whose kernel hash no longer matches its generated module is stale and
ignored (as an exact entry and as a neighbour). Each fallback warns once per (kernel, reason) with
:class:`DispatchWarning`; the Triton interpreter (no GPU) falls back silently. A table that cannot be
read (bad JSON, unknown or missing keys, another schema version, invalid config values) is a
:class:`DispatchTableError` naming the file for the tools that read or write tables; at run time it
is skipped with a warning that names the file and says the default configs are used instead.

Tables are read once per process (:func:`reload` forgets them); a lookup is a bucket scan and a
cached dictionary hit (the derivation runs once per kernel, bucket and GPU).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import paths
from .buckets import by_name, decode_bucket, prefill_bucket
from .config import (
    Config,
    ConfigKeysError,
    DecodeConfig,
    PrefillConfig,
    default_decode_config,
    default_prefill_config,
)
from .derive import derive, fresh, tune_command
from .device import GPUInfo, gpu_info
from .launch import forget_plans
from .loader import module_hash
from .resources import fit_shared_memory
from .spec import MLASpec

SCHEMA_VERSION = 1
INTERPRETER_CAPABILITY = "cpu"
_TOP_KEYS = {"schema_version", "gpu", "kernels"}
_GPU_KEYS = {"key", "name", "capability", "num_sms"}
_ENTRY_KEYS = {"config", "time_us", "default_time_us", "kernel_hash", "trials", "versions"}
_VERSION_KEYS = {"torch", "triton", "cuda"}
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class DispatchTableError(ValueError):
    """A dispatch table that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: Path | str | None, message: str) -> None:
        self.path = path
        super().__init__(f"{path or '<dispatch table>'}: {message}")


class DispatchWarning(UserWarning):
    """A lookup fell back (another GPU's entry, the default config) or skipped a table or entry."""


@dataclass(frozen=True)
class Entry:
    """One tuned config for one (GPU, kernel, bucket)."""

    config: Config
    time_us: float
    default_time_us: float | None
    kernel_hash: str
    trials: int
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.default_time_us is None else self.default_time_us / self.time_us

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "time_us": round(self.time_us, 2),
            "default_time_us": None if self.default_time_us is None else round(self.default_time_us, 2),
            "kernel_hash": self.kernel_hash,
            "trials": self.trials,
            "versions": dict(self.versions),
        }


@dataclass
class Table:
    """One GPU's table: kernel name -> bucket name -> Entry."""

    gpu: GPUInfo
    kernels: dict[str, dict[str, Entry]] = field(default_factory=dict)
    path: Path | None = None
    outdated: dict[str, str] = field(default_factory=dict)
    """Entries skipped on reading ("kernel.bucket" -> why): their config has the keys of another
    mla-tuner version, so they are stale by construction; they are not written back."""

    def entry(self, kernel: str, bucket: str) -> Entry | None:
        return self.kernels.get(kernel, {}).get(bucket)

    def to_json(self) -> str:
        data = {
            "schema_version": SCHEMA_VERSION,
            "gpu": {"key": self.gpu.key, "name": self.gpu.name, "capability": self.gpu.capability,
                    "num_sms": self.gpu.num_sms},
            "kernels": {k: {b: e.to_json() for b, e in buckets.items()}
                        for k, buckets in self.kernels.items() if buckets},
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------------
# Reading and validating


def _keys(where: str, data: object, expected: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, found {type(data).__name__}")
    unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    return data


def _number(where: str, value: object, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: expected a positive number, found {value!r}")
    return float(value)


class OutdatedEntryError(ValueError):
    """An entry written by another version of mla-tuner: its config has other launch parameters, or one
    this version's kernel no longer takes. Skipped with a warning, dropped on the next merge."""


def _entry_from_json(spec: MLASpec, where: str, data: object) -> Entry:
    data = _keys(where, data, _ENTRY_KEYS)
    config_cls = DecodeConfig if spec.is_decode else PrefillConfig
    raw = data["config"]
    if not isinstance(raw, dict):
        raise ValueError(f"{where}.config: expected an object, found {type(raw).__name__}")
    try:
        config = config_cls.from_dict(raw)
    except ConfigKeysError as err:  # a launch parameter added or removed since: another version's entry
        raise OutdatedEntryError(f"{where}.config: {err} (tuned by another mla-tuner version)") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}.config: {err}") from None
    try:
        config.check_spec(spec)
    except ValueError as err:  # a well-formed config that this version's kernel no longer takes
        raise OutdatedEntryError(f"{where}.config: {err} (tuned by another mla-tuner version)") from None
    versions = _keys(f"{where}.versions", data["versions"], _VERSION_KEYS)
    if not all(isinstance(v, str) for v in versions.values()):
        raise ValueError(f"{where}.versions: expected strings, found {versions!r}")
    if not isinstance(data["kernel_hash"], str) or not data["kernel_hash"]:
        raise ValueError(f"{where}.kernel_hash: expected a non-empty string, found {data['kernel_hash']!r}")
    trials = data["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"{where}.trials: expected a non-negative int, found {trials!r}")
    time_us = _number(f"{where}.time_us", data["time_us"])
    assert time_us is not None
    return Entry(config, time_us, _number(f"{where}.default_time_us", data["default_time_us"], True),
                 data["kernel_hash"], trials, versions)


def _gpu_from_json(data: object) -> GPUInfo:
    data = _keys("gpu", data, _GPU_KEYS)
    for name in ("key", "name", "capability"):
        if not isinstance(data[name], str) or not data[name]:
            raise ValueError(f"gpu.{name}: expected a non-empty string, found {data[name]!r}")
    if not _KEY_RE.match(data["key"]):
        raise ValueError(f"gpu.key: expected lowercase letters, digits, '.', '_' or '-', found {data['key']!r}")
    num_sms = data["num_sms"]
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms <= 0:
        raise ValueError(f"gpu.num_sms: expected a positive int, found {num_sms!r}")
    return GPUInfo(key=data["key"], name=data["name"], capability=data["capability"], num_sms=num_sms)


def parse_table(text: str, path: Path | str | None = None) -> Table:
    """Parse and validate a table; DispatchTableError naming ``path`` on any problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DispatchTableError(path, f"not valid JSON ({err})") from None
    try:
        # The version first: another version's table has other keys too.
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"schema_version: expected {SCHEMA_VERSION}, found {data['schema_version']!r} "
                             "(re-run `mla-tune tune` with this version)")
        data = _keys("top level", data, _TOP_KEYS)
        gpu = _gpu_from_json(data["gpu"])
        if path is not None and Path(path).stem != gpu.key:
            raise ValueError(f"gpu.key: expected {Path(path).stem!r} (the file name), found {gpu.key!r}")
        kernels_raw = data["kernels"]
        if not isinstance(kernels_raw, dict):
            raise ValueError(f"kernels: expected an object, found {type(kernels_raw).__name__}")
        kernels: dict[str, dict[str, Entry]] = {}
        outdated: dict[str, str] = {}
        for kernel, entries in kernels_raw.items():
            try:
                spec = MLASpec.from_name(kernel)
            except ValueError as err:
                raise ValueError(f"kernels: {err}") from None
            if not isinstance(entries, dict):
                raise ValueError(f"kernels.{kernel}: expected an object, found {type(entries).__name__}")
            kind = "decode" if spec.is_decode else "prefill"
            for bucket in entries:
                try:
                    by_name(kind, bucket)
                except ValueError as err:
                    raise ValueError(f"kernels.{kernel}: {err}") from None
            kernels[kernel] = {}
            for b, e in entries.items():
                try:
                    kernels[kernel][b] = _entry_from_json(spec, f"kernels.{kernel}.{b}", e)
                except OutdatedEntryError as err:
                    outdated[f"{kernel}.{b}"] = str(err)
    except ValueError as err:
        raise DispatchTableError(path, str(err)) from None
    return Table(gpu, kernels, Path(path) if path is not None else None, outdated)


def load_table(path: Path) -> Table:
    """Read one table file (DispatchTableError if it is unreadable or invalid)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise DispatchTableError(path, f"cannot read ({err.strerror or err})") from None
    return parse_table(text, path)


def table_path(gpu_key: str, folder: Path | None = None) -> Path:
    if not _KEY_RE.match(gpu_key):
        raise ValueError(f"gpu_key: expected lowercase letters, digits, '.', '_' or '-', found {gpu_key!r}")
    return (folder if folder is not None else paths.dispatch_dir()) / f"{gpu_key}.json"


# ---------------------------------------------------------------------------------------------------
# Writing


def versions() -> dict[str, str]:
    """The versions an entry is stamped with."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "none"}


def merge(gpu: GPUInfo, entries: Mapping[tuple[str, str], Entry], folder: Path | None = None) -> Path:
    """Merge ``entries`` ((kernel name, bucket) -> Entry) into ``gpu``'s table and write it atomically.

    Entries for other kernels and buckets are kept, except those tuned by another mla-tuner version
    (their config keys differ: stale by construction), which are dropped. An existing file that cannot
    be read is an error (DispatchTableError): it is not overwritten.
    """
    from .fileio import write_atomic

    path = table_path(gpu.key, folder)
    table = load_table(path) if path.exists() else Table(gpu)
    if table.gpu.capability != gpu.capability:
        raise DispatchTableError(path, f"holds a GPU of capability {table.gpu.capability}, "
                                       f"expected {gpu.capability} (the GPU key {gpu.key!r} is reused?)")
    table.gpu = gpu
    for (kernel, bucket), entry in entries.items():
        spec = MLASpec.from_name(kernel)
        by_name("decode" if spec.is_decode else "prefill", bucket)
        table.kernels.setdefault(kernel, {})[bucket] = entry
    write_atomic(path, table.to_json())
    reload()
    return path


# ---------------------------------------------------------------------------------------------------
# Runtime lookup

_warned: set[tuple[str, str]] = set()


def _warn_once(kernel: str, reason: str, message: str) -> None:
    if (kernel, reason) not in _warned:
        _warned.add((kernel, reason))
        warnings.warn(message, DispatchWarning, stacklevel=4)


@functools.lru_cache(maxsize=8)
def _tables(token: str | None) -> dict[str, Table]:
    """Every readable table of the dispatch folder, by GPU key (``token``: the folder's env setting)."""
    folder = paths.dispatch_dir()
    tables: dict[str, Table] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            table = load_table(path)
        except DispatchTableError as err:
            _warn_once(str(path), "unreadable", f"ignoring dispatch table: {err}; the default configs "
                                                "are used for that GPU")
            continue
        if table.outdated:
            _warn_once(str(path), "outdated", f"{path}: ignoring {len(table.outdated)} entries tuned by another "
                                              f"mla-tuner version (e.g. {next(iter(table.outdated.values()))}); "
                                              "re-run `mla-tune tune`")
        tables[table.gpu.key] = table
    return tables


def _candidates(gpu: GPUInfo, tables: Mapping[str, Table]) -> list[Table]:
    """The exact GPU's table first, then tables of the same capability (same SM count first)."""
    exact = [tables[gpu.key]] if gpu.key in tables else []
    same = sorted((t for k, t in tables.items() if k != gpu.key and t.gpu.capability == gpu.capability),
                  key=lambda t: (t.gpu.num_sms != gpu.num_sms, t.gpu.key))
    return exact + same


@functools.lru_cache(maxsize=4096)
def _resolve(spec: MLASpec, bucket: str, gpu: GPUInfo, token: str | None) -> tuple[Config | None, str]:
    kernel = spec.name()
    current_hash: str | None = None
    tables = _candidates(gpu, _tables(token))
    for table in tables:
        entry = table.entry(kernel, bucket)
        if entry is None:
            continue
        if current_hash is None:
            try:
                current_hash = module_hash(spec)
            except OSError as err:
                _warn_once(kernel, "hash", f"{kernel}: cannot hash its generated module ({err}); "
                                           "ignoring its tuned entries")
                break
        if entry.kernel_hash != current_hash:
            _warn_once(kernel, "stale", f"{kernel}: ignoring the entry of {table.gpu.key} in {table.path}: it "
                                        f"was tuned for kernel hash {entry.kernel_hash}, the generated module "
                                        f"now hashes to {current_hash}; re-run `mla-tune tune`")
            continue
        if table.gpu.key == gpu.key:
            return entry.config, f"tuned on {gpu.key}"
        _warn_once(kernel, "capability", f"{kernel}: no entry for {gpu.key}; using the one tuned on "
                                         f"{table.gpu.key} (same compute capability {gpu.capability})")
        return entry.config, f"tuned on {table.gpu.key} (same capability)"
    derived = derive(spec, by_name("decode" if spec.is_decode else "prefill", bucket), tables, gpu, fresh)
    config, source = derived if derived is not None else (None, "default")
    if gpu.capability != INTERPRETER_CAPABILITY:
        what = f"a config {source}" if config is not None else "the default config"
        _warn_once(kernel, "untuned", f"{kernel}: no tuned dispatch entry for {gpu.key} (bucket {bucket}) in "
                                      f"{paths.dispatch_dir()}; using {what} (to tune it on this GPU: "
                                      f"`{tune_command(spec)}`)")
    return config, source


def tables_for(gpu: GPUInfo) -> list[Table]:
    """The tables a lookup on ``gpu`` reads, in the order it reads them (this GPU's, then the same capability's)."""
    return _candidates(gpu, _tables(_token()))


def _token() -> str | None:
    return os.environ.get(paths.ENV_GENERATED_DIR)


def select(spec: MLASpec, rows: int, avg_kv_len: float, gpu: GPUInfo) -> tuple[Config, str, str]:
    """(config, bucket name, where it came from) for ``rows`` (decode: batch, prefill: total
    queries) of ``avg_kv_len`` mean KV tokens on ``gpu``."""
    bucket = (decode_bucket if spec.is_decode else prefill_bucket)(rows, avg_kv_len).name
    config, source = _resolve(spec, bucket, gpu, _token())
    if config is None:
        config = untuned_config(spec, rows, avg_kv_len, gpu)
    return config, bucket, source


def untuned_config(spec: MLASpec, rows: int, avg_kv_len: float, gpu: GPUInfo) -> Config:
    """What runs without a tuned entry: the default config for ``rows`` (decode: batch, prefill: total
    queries) of ``avg_kv_len`` mean KV tokens, shrunk to ``gpu``'s shared memory where it needs more."""
    config = (default_decode_config(spec, rows, avg_kv_len, gpu.num_sms, gpu.hopper) if spec.is_decode
              else default_prefill_config(spec, gpu.hopper))
    return fit_shared_memory(spec, config, gpu.shared_bytes)


def decode_config(spec: MLASpec, batch: int, avg_kv_len: float, device: torch.device) -> DecodeConfig:
    """The config for a decode batch of ``batch`` requests of ``avg_kv_len`` tokens on average."""
    config = select(spec, batch, avg_kv_len, gpu_info(device))[0]
    assert isinstance(config, DecodeConfig)
    return config


def prefill_config(spec: MLASpec, total_q: int, avg_kv_len: float, device: torch.device) -> PrefillConfig:
    """The config for a prefill of ``total_q`` queries over requests of ``avg_kv_len`` tokens on average."""
    config = select(spec, total_q, avg_kv_len, gpu_info(device))[0]
    assert isinstance(config, PrefillConfig)
    return config


def reload() -> None:
    """Forget the tables read, the warnings given and the one-call forms' plans, whose configs came from the
    tables (after writing a table; in tests)."""
    _tables.cache_clear()
    _resolve.cache_clear()
    _warned.clear()
    forget_plans()
