"""Workloads: the public benchmark set (``docs/benchmark_set.md``) and synthetic inputs for any shape.

Inputs follow the timing rules of ``docs/contract.md``: random normal values (never zeros), page
ids a random permutation of the cache's pages, fixed seeds so every run sees the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tuner.runtime.spec import MLASpec

SM_SCALE = 1.0 / math.sqrt(128 + 64)  # DeepSeek: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
MAX_SPECULATIVE_QUERIES = 8  # draft tokens per request that still count as speculative decoding
FP8 = torch.float8_e4m3fn  # the quantized cache's dtype
FP8_MAX = float(torch.finfo(FP8).max)  # 448: a per-tensor scale of amax / 448 uses the whole fp8 range


@dataclass(frozen=True)
class Workload:
    """One batch: per-sequence KV lengths and, for prefill, query lengths (None for decode).

    ``page_size``: the one page size the row is defined at (None: it runs at whatever page sizes the
    caller chooses, ``mla-tune bench``'s 1 and 64 by default).
    """

    name: str
    heads: int
    kv_lens: tuple[int, ...]
    q_lens: tuple[int, ...] | None = None
    causal: bool = True
    head_dim_ckv: int = 512
    head_dim_kpe: int = 64
    page_size: int | None = None

    @property
    def is_decode(self) -> bool:
        return self.q_lens is None

    @property
    def queries_per_request(self) -> int | None:
        """1 for decode, s_q when every sequence has the same s_q queries, otherwise None."""
        if self.q_lens is None:
            return 1
        return self.q_lens[0] if self.q_lens and len(set(self.q_lens)) == 1 else None

    @property
    def is_speculative(self) -> bool:
        """A speculative-decoding step: every request verifies the same few (2..MAX_SPECULATIVE_QUERIES)
        draft tokens, causal among them, as a causal prefill of those queries."""
        s_q = self.queries_per_request
        return self.causal and s_q is not None and 1 < s_q <= MAX_SPECULATIVE_QUERIES

    @property
    def batch(self) -> int:
        return len(self.kv_lens)

    @property
    def total_q(self) -> int:
        return self.batch if self.q_lens is None else sum(self.q_lens)

    @property
    def avg_kv_len(self) -> float:
        """Mean KV tokens per sequence (what the runtime picks a bucket by)."""
        return sum(self.kv_lens) / max(1, self.batch)

    def spec(self, page_size: int) -> MLASpec:
        variant = "decode" if self.is_decode else ("prefill_causal" if self.causal else "prefill")
        return MLASpec(variant, self.heads, self.head_dim_ckv, self.head_dim_kpe, page_size)  # type: ignore[arg-type]

    def visible_pairs(self) -> int:
        """(query, visible token) pairs, per head."""
        if self.q_lens is None:
            return sum(self.kv_lens)
        if not self.causal:
            return sum(q * kv for q, kv in zip(self.q_lens, self.kv_lens, strict=True))
        return sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(self.q_lens, self.kv_lens, strict=True))

    def bytes_moved(self, itemsize: int = 2, kv_itemsize: int | None = None) -> int:
        """Each KV token read once (``kv_itemsize`` bytes an element: 1 for an fp8 cache; default
        ``itemsize``), plus q, output (``itemsize``: the input dtype) and lse (float32)."""
        kv = sum(self.kv_lens) * (self.head_dim_ckv + self.head_dim_kpe) * (kv_itemsize or itemsize)
        q = self.total_q * self.heads * (self.head_dim_ckv + self.head_dim_kpe) * itemsize
        o = self.total_q * self.heads * (self.head_dim_ckv * itemsize + 4)
        return kv + q + o

    def flops(self) -> int:
        """Per (query, head, visible token): 2 * (ckv + kpe) + 2 * ckv."""
        per = 2 * (self.head_dim_ckv + self.head_dim_kpe) + 2 * self.head_dim_ckv
        return self.visible_pairs() * self.heads * per


def skewed_lengths(n: int, median: float, lo: int, hi: int, sigma: float, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median))
    return tuple(int(v) for v in x.clamp(lo, hi).round().long())


def _uniform(n: int, lo: int, hi: int, g: torch.Generator) -> list[int]:
    return [int(v) for v in torch.randint(lo, hi + 1, (n,), generator=g)]


def _p16_var() -> Workload:
    g = torch.Generator().manual_seed(0)
    q = _uniform(16, 64, 1024, g)
    extra = _uniform(16, 0, 4096, g)
    return Workload("p-16-var", 16, tuple(a + b for a, b in zip(q, extra, strict=True)), tuple(q))


def _p28_fresh() -> Workload:
    """28 fresh prompts, lognormal lengths clipped to 16..420 (about 1950 queries), 1..8-token prefixes."""
    q = skewed_lengths(28, 38, 16, 420, 0.9, seed=1)
    prefix = _uniform(28, 1, 8, torch.Generator().manual_seed(1))
    return Workload("p-28-fresh", 16, tuple(a + b for a, b in zip(q, prefix, strict=True)), q)


def public_rows() -> list[Workload]:
    """Decode and prefill rows of ``docs/benchmark_set.md`` (each runs at the caller's page sizes)."""
    return [
        Workload("d-b1-1k", 16, (1024,)),
        Workload("d-b32-4k", 16, (4096,) * 32),
        Workload("d-b64-8k", 16, (8192,) * 64),
        Workload("d-b128-2k", 16, (2048,) * 128),
        Workload("d-b256-4k", 16, (4096,) * 256),
        Workload("d-b16-32k", 16, (32768,) * 16),
        Workload("d-b64-skew", 16, skewed_lengths(64, 700, 500, 9200, 0.9, seed=2)),
        Workload("d-h128-b32-4k", 128, (4096,) * 32),
        Workload("d-h128-b128-4k", 128, (4096,) * 128),
        Workload("p-1x4k", 16, (4096,), (4096,)),
        Workload("p-8x512-prefix", 16, (4096,) * 8, (512,) * 8),
        _p16_var(),
        _p28_fresh(),
    ]


def _speculative(name: str, heads: int, batch: int, s_q: int, kv_len: int) -> Workload:
    """``batch`` requests of ``kv_len`` tokens whose last ``s_q`` are the queries (query j at position
    kv_len - s_q + j sees tokens 0 .. kv_len - s_q + j): a causal prefill of s_q queries per request."""
    return Workload(name, heads, (kv_len,) * batch, (s_q,) * batch)


def speculative_rows() -> list[Workload]:
    """Speculative decoding (multi-token prediction) rows of ``docs/benchmark_set.md``."""
    return [
        _speculative("mtp2-h16-b64-4k", 16, 64, 2, 4096),
        _speculative("mtp2-h128-b64-4k", 128, 64, 2, 4096),
        _speculative("mtp4-h128-b32-8k", 128, 32, 4, 8192),
    ]


def off_table_rows() -> list[Workload]:
    """Off-table rows of ``docs/benchmark_set.md``: shapes the tuned table does not target, each at its
    own page size."""
    short = (3, 9, 17, 31, 48, 64, 80, 100, 130, 200, 260, 400)
    return [
        Workload("o-h16-ps16-b12-short", 16, short, page_size=16),
        Workload("o-h64-ps64-b32-4k", 64, (4096,) * 32, page_size=64),
        Workload("o-h32-ps32-b64-2k", 32, (2048,) * 64, page_size=32),
        Workload("o-h8-ps1-b128-1k", 8, (1024,) * 128, page_size=1),
        Workload("o-h128-ps16-b16-8k", 128, (8192,) * 16, page_size=16),
        Workload("o-p-h64-ps16-8x1k", 64, (1536,) * 8, (1024,) * 8, page_size=16),
        Workload("o-p-h32-ps32-4x2k", 32, (2048,) * 4, (2048,) * 4, page_size=32),
    ]


ROW_SETS = {"public": public_rows, "mtp": speculative_rows, "off": off_table_rows}


def benchmark_set(sets: tuple[str, ...] | list[str] | None = None) -> list[Workload]:
    """The rows of ``docs/benchmark_set.md``: the sets named (keys of ``ROW_SETS``; None: all, in the
    order public, mtp, off)."""
    names = list(ROW_SETS) if sets is None else list(sets)
    unknown = [n for n in names if n not in ROW_SETS]
    if unknown:
        raise ValueError(f"sets: unknown {unknown}; expected some of {list(ROW_SETS)}")
    return [w for n in names for w in ROW_SETS[n]()]


@dataclass
class Inputs:
    """Tensors for one workload at one page size (arguments of mla_decode / mla_prefill).

    In the fused layout (``make_inputs(..., fused=True)``) ``ckv_cache`` and ``kpe_cache`` are the column
    views ``kv_cache[..., :ckv]`` and ``kv_cache[..., ckv:]`` of one cache, as FlashMLA and SGLang keep it.
    An fp8 cache (``make_inputs(..., kv_dtype=FP8)``) comes with its per-tensor scales ``ckv_scale`` and
    ``kpe_scale`` (Python floats: a cached value is ``fp8 * scale``; None for a 16-bit cache).
    """

    q_nope: torch.Tensor
    q_pe: torch.Tensor
    ckv_cache: torch.Tensor
    kpe_cache: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    qo_indptr: torch.Tensor | None
    sm_scale: float = SM_SCALE
    extra: dict[str, object] = field(default_factory=dict)
    kv_cache: torch.Tensor | None = None  # fused layout: [num_pages, page_size, ckv + kpe], the two caches' base
    ckv_scale: float | None = None  # fp8 cache: the per-tensor scales (equal in the fused layout)
    kpe_scale: float | None = None

    @property
    def scales(self) -> dict[str, float]:
        """``{"ckv_scale": .., "kpe_scale": ..}`` for an fp8 cache, ``{}`` for a 16-bit one: the keyword
        arguments that the runtime and the reference take."""
        if self.ckv_scale is None or self.kpe_scale is None:
            return {}
        return {"ckv_scale": self.ckv_scale, "kpe_scale": self.kpe_scale}


def fp8_scale(*tensors: torch.Tensor) -> float:
    """The per-tensor scale that maps the largest finite magnitude of ``tensors`` onto fp8's largest value
    (amax / 448; NaN, e.g. in poisoned slots, is left out), as a float32 value; 1.0 when they are empty or all
    zero."""
    amax = max((torch.nan_to_num(t.float(), nan=0.0).abs().amax() for t in tensors if t.numel()),
               default=torch.tensor(0.0))
    return float(amax / FP8_MAX) if float(amax) > 0 else 1.0


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` in float8_e4m3fn (clamped to its range): dequantized, ``fp8 * scale`` is ``x`` rounded."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def make_inputs(w: Workload, page_size: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu", seed: int = 0, spare_pages: int = 0,
                poison_unused: bool = True, fused: bool = False, kv_dtype: torch.dtype | None = None) -> Inputs:
    """Random inputs for ``w``: page ids a random permutation of the cache's pages, unused slots of
    partial last pages filled with NaN (``poison_unused``) so that a leak shows.

    ``fused``: one [num_pages, page_size, ckv + kpe] cache (``Inputs.kv_cache``) of which the two caches
    are column views; the values are the same as without it.

    ``kv_dtype``: None (the caches in ``dtype``) or float8_e4m3fn: the same ``dtype`` values (the same
    random draws) quantized with per-tensor scales of amax / 448 (``Inputs.ckv_scale``, ``kpe_scale``),
    one per cache, or one for both in the fused layout (one fp8 tensor has one scale: FlashMLA's single
    ``descale_k``); the queries stay in ``dtype``.

    The page permutation is drawn on the CPU (the same on every device); the values on ``device`` by a
    generator of its own seeded with ``seed``: on a GPU a cache of a million tokens takes milliseconds, where
    drawing it on the CPU and copying it took seconds per set of inputs (the tuner builds several per study).
    On the CPU every draw comes from the one generator, in the order of the arguments."""
    if kv_dtype not in (None, dtype, FP8):
        raise ValueError(f"kv_dtype: expected None or {FP8}, found {kv_dtype}")
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    values = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    pages = [-(-n // page_size) for n in w.kv_lens]
    num_pages = sum(pages) + spare_pages
    perm = torch.randperm(num_pages, generator=g)[: sum(pages)].to(torch.int32)
    indptr = torch.zeros(w.batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(pages, dtype=torch.int64), 0).to(torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else page_size for n in w.kv_lens], dtype=torch.int32)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=values, dtype=torch.float32, device=values.device).to(dtype)

    ckv = randn(num_pages, page_size, w.head_dim_ckv)
    kpe = randn(num_pages, page_size, w.head_dim_kpe)
    scales: dict[str, float] = {}
    if kv_dtype == FP8:  # scales from the values before the NaN poisoning (which fp8 e4m3fn can hold)
        ckv_scale, kpe_scale = (fp8_scale(ckv, kpe),) * 2 if fused else (fp8_scale(ckv), fp8_scale(kpe))
        ckv, kpe = quantize_fp8(ckv, ckv_scale), quantize_fp8(kpe, kpe_scale)
        scales = {"ckv_scale": ckv_scale, "kpe_scale": kpe_scale}
    if poison_unused and page_size > 1:
        for b, n in enumerate(w.kv_lens):
            if n % page_size:
                page = int(perm[int(indptr[b + 1]) - 1])
                ckv[page, n % page_size:] = float("nan")
                kpe[page, n % page_size:] = float("nan")
    qo = None
    if w.q_lens is not None:
        qo = torch.zeros(w.batch + 1, dtype=torch.int32)
        qo[1:] = torch.cumsum(torch.tensor(w.q_lens, dtype=torch.int64), 0).to(torch.int32)
    q_nope = randn(w.total_q, w.heads, w.head_dim_ckv)
    q_pe = randn(w.total_q, w.heads, w.head_dim_kpe)
    kv = None
    if fused:
        kv = torch.cat([ckv, kpe], dim=-1).to(device)
        ckv, kpe = kv[..., : w.head_dim_ckv], kv[..., w.head_dim_ckv:]
    return Inputs(q_nope.to(device), q_pe.to(device), ckv.to(device), kpe.to(device), indptr.to(device),
                  perm.to(device), last.to(device), None if qo is None else qo.to(device), kv_cache=kv,
                  **scales)
