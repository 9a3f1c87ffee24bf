"""Shape buckets: the batch shapes a tuned config is chosen for, and the workload each is tuned on.

The runtime picks a bucket from what it knows on the host without a device sync: decode from the
batch size B and the mean KV length per request, prefill from the total number of queries and the
mean KV length per request. The functional forms estimate the mean from the page count
(``kv_indices.numel() * page_size / B``, an upper bound by less than a page); ``plan()`` knows it
exactly. Ranges are ``lo < x <= hi`` (``hi`` None: unbounded).

Decode (6 buckets): batch 1-16 / 17-96 / 97+ by mean KV up to 2k / above 2k.
Prefill (4 buckets): up to 256 queries (a chunk of a prompt), 257-2k queries (a handful of fresh
prompts), and above 2k queries with mean KV up to 2k / above 2k. The edges put every row of
the benchmark set (``docs/benchmark_set.md``) well inside one bucket and cover serving ranges (batch 1-512,
KV 128-128k, prompts up to tens of thousands of tokens).

Each bucket is tuned on one representative synthetic workload (:meth:`Bucket.workload`): lengths
drawn lognormal around the bucket's typical value with fixed seeds (serving-like skew), the
page ids a random permutation (``tuner.harness.inputs.make_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .spec import MLASpec

Kind = Literal["decode", "prefill"]


@dataclass(frozen=True)
class Lengths:
    """Lognormal lengths: ``count`` values around ``median``, clipped to [lo, hi], fixed ``seed``."""

    count: int
    median: int
    lo: int
    hi: int
    sigma: float = 0.5
    seed: int = 0

    @property
    def typical(self) -> int:
        """The median, clipped to [lo, hi]."""
        return min(max(self.median, self.lo), self.hi)


@dataclass(frozen=True)
class Bucket:
    """One shape bucket.

    kind: decode or prefill. rows: (lo, hi] of the batch size (decode) or total queries (prefill);
    kv: (lo, hi] of the mean KV length per request; hi None is unbounded.
    lengths: decode: the KV lengths of the representative batch; prefill: its query lengths.
    prefix: prefill only: tokens already cached before each sequence's queries (kv = q + prefix).
    """

    kind: Kind
    rows: tuple[int, int | None]
    kv: tuple[int, int | None]
    lengths: Lengths
    prefix: Lengths | None = None

    @property
    def name(self) -> str:
        letter = "b" if self.kind == "decode" else "q"
        rows = _range(letter, self.rows)
        if self.kv == (0, None):
            return rows
        return f"{rows}_{_range('kv', self.kv)}"

    def describe(self) -> str:
        """The exact ranges: ``16 < batch <= 96, 2048 < kv``."""
        def part(name: str, bounds: tuple[int, int | None]) -> str:
            lo, hi = bounds
            return f"{lo} < {name}" + (f" <= {hi}" if hi is not None else "")

        return f"{part('batch' if self.kind == 'decode' else 'queries', self.rows)}, {part('kv', self.kv)}"

    def contains(self, rows: float, avg_kv: float) -> bool:
        return _inside(rows, self.rows) and _inside(avg_kv, self.kv)

    def check_kind(self, spec: MLASpec) -> None:
        if spec.is_decode != (self.kind == "decode"):
            raise ValueError(f"spec: bucket {self.name} is for {self.kind}, found {spec.name()}")


def _inside(x: float, bounds: tuple[int, int | None]) -> bool:
    lo, hi = bounds
    return x > lo and (hi is None or x <= hi)


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _range(letter: str, bounds: tuple[int, int | None]) -> str:
    lo, hi = bounds
    if hi is None:  # "b97+": above 96; "kv2k+": above 2048
        return f"{letter}{_size(lo) if lo % 1024 == 0 else lo + 1}+"
    return f"{letter}{_size(lo + 1) if lo else 1}-{_size(hi)}" if lo + 1 != hi else f"{letter}{hi}"


_SHORT_KV, _LONG_KV = (0, 2048), (2048, None)

DECODE_BUCKETS: tuple[Bucket, ...] = (
    Bucket("decode", (0, 16), _SHORT_KV, Lengths(4, 1024, 128, 2048, seed=11)),
    Bucket("decode", (0, 16), _LONG_KV, Lengths(8, 16384, 4096, 65536, seed=12)),
    Bucket("decode", (16, 96), _SHORT_KV, Lengths(48, 900, 256, 2048, sigma=0.6, seed=13)),
    Bucket("decode", (16, 96), _LONG_KV, Lengths(48, 6144, 2560, 32768, seed=14)),
    Bucket("decode", (96, None), _SHORT_KV, Lengths(192, 1280, 256, 2048, seed=15)),
    Bucket("decode", (96, None), _LONG_KV, Lengths(256, 4096, 2560, 16384, sigma=0.4, seed=16)),
)
"""Decode buckets: batch (0,16] (16,96] (96,inf) x mean KV (0,2k] (2k,inf)."""

PREFILL_BUCKETS: tuple[Bucket, ...] = (
    Bucket("prefill", (0, 256), (0, None), Lengths(2, 96, 96, 96), Lengths(2, 1952, 1952, 1952)),
    Bucket("prefill", (256, 2048), (0, None), Lengths(16, 64, 16, 420, sigma=0.9, seed=21),
           Lengths(16, 4, 1, 8, seed=22)),
    Bucket("prefill", (2048, None), _SHORT_KV, Lengths(24, 256, 64, 1024, sigma=0.7, seed=23),
           Lengths(24, 16, 1, 64, seed=24)),
    Bucket("prefill", (2048, None), _LONG_KV, Lengths(4, 1024, 512, 2048, sigma=0.6, seed=25),
           Lengths(4, 2560, 1024, 3584, sigma=0.6, seed=26)),
)
"""Prefill buckets: total queries (0,256] (256,2k] (2k,inf), the last split by mean KV (0,2k] (2k,inf)."""


def buckets_for(spec: MLASpec) -> tuple[Bucket, ...]:
    return DECODE_BUCKETS if spec.is_decode else PREFILL_BUCKETS


def bucket_names(kind: Kind) -> tuple[str, ...]:
    return tuple(b.name for b in (DECODE_BUCKETS if kind == "decode" else PREFILL_BUCKETS))


def by_name(kind: Kind, name: str) -> Bucket:
    for bucket in DECODE_BUCKETS if kind == "decode" else PREFILL_BUCKETS:
        if bucket.name == name:
            return bucket
    raise ValueError(f"bucket: expected one of {', '.join(bucket_names(kind))} for {kind}, found {name!r}")


def decode_bucket(batch: int, avg_kv_len: float) -> Bucket:
    """The decode bucket of a batch of ``batch`` requests of ``avg_kv_len`` KV tokens on average."""
    return _find(DECODE_BUCKETS, batch, avg_kv_len)


def prefill_bucket(total_q: int, avg_kv_len: float) -> Bucket:
    """The prefill bucket of ``total_q`` queries over requests of ``avg_kv_len`` KV tokens on average."""
    return _find(PREFILL_BUCKETS, total_q, avg_kv_len)


def _find(table: tuple[Bucket, ...], rows: float, avg_kv: float) -> Bucket:
    rows = max(rows, 1)  # an empty batch takes the smallest bucket
    avg_kv = max(avg_kv, 1)
    for bucket in table:
        if bucket.contains(rows, avg_kv):
            return bucket
    raise AssertionError(f"buckets do not cover rows={rows}, avg_kv={avg_kv}")  # unreachable: they tile
