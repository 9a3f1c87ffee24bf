"""Launch configurations: the tunable parameters of each kernel, as frozen, validated dataclasses.

Tuning never changes generated code: every field here is a launch-time argument of a generated
module's ``launch()``. ``default_*_config`` give a sensible starting point per shape; the tuner's
search space always contains it and tries it first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .spec import MLASpec


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def tile_in_page(spec: MLASpec, block_n: int) -> bool:
    """Whether a KV tile of block_n tokens lies inside one page (what bulk copies need)."""
    return block_n <= spec.page_size


def tile_of_pages(spec: MLASpec, block_n: int) -> bool:
    """Whether a KV tile of block_n tokens is whole pages of 8+ tokens: the warp-specialized kernels' loader
    can then copy it page by page by bulk copies (a ws config with tma=1; the generated ``ws_paged``)."""
    return spec.page_size >= 8 and block_n > spec.page_size and block_n % spec.page_size == 0


def ws_capable(spec: MLASpec) -> bool:
    """Whether ``spec``'s generated module holds the warp-specialized kernel (Gluon, Hopper): 64-row
    tiles (decode: heads in groups of 64, or 8 to 32 heads as wgmma's N with the KV tile's tokens as
    its M; prefill: 64 // heads tokens x all heads, or one token x 64 heads) and head dims a wgmma can
    take. Any page size: a KV tile inside one page arrives by bulk copies, one that spans pages is
    gathered row by row. Not over an fp8 cache: the Triton kernels run it (a Gluon stage 1 that widened each
    fp8 stage in shared memory was slower than them, perf/LOG.md v16)."""
    heads = 64 % spec.num_heads == 0 or spec.num_heads % 64 == 0
    if spec.fp8:  # the Triton kernels widen fp8 tiles in registers; the Gluon kernels take 16-bit tiles
        return False
    if spec.is_decode and spec.num_heads < 8:  # below 64 heads the heads are wgmma's N: at least 8
        return False
    return heads and 32 <= spec.head_dim_ckv <= 512 and spec.head_dim_kpe <= 256


def ws_block_h(spec: MLASpec) -> int:
    """block_h of a warp-specialized config: decode, the default's heads per program (16, 32 or 64;
    below 64 heads the kernel takes all heads at once); prefill, the heads of a 64-row query tile."""
    if spec.is_decode:
        return 16 if spec.num_heads <= 16 else (32 if spec.num_heads <= 32 else 64)
    return min(spec.num_heads, 64)


def ws_narrow(spec: MLASpec) -> bool:
    """Whether ``spec``'s warp-specialized decode swaps its products (fewer than 64 heads: the KV
    tile's tokens are wgmma's M, so its tiles are 64 tokens, block_n 64)."""
    return spec.is_decode and spec.num_heads < 64


def ws_tiles(spec: MLASpec) -> tuple[int, int]:
    """(block_n, num_stages) of the warp-specialized kernel's default: 64-token tiles, 2 stages of them;
    decode at 64 heads and more over pages of 16 or 32 tokens, one page per tile, 4 stages (what fits in
    227 KB beside the 64 query rows): bulk copies from one page where the tile fits in it, else gathered
    tiles. Prefill gathers 64-token tiles at every page size: the H200 catalogue tune preferred them to
    one-page tiles on 14 of 16 prefill buckets at pages of 16 and 32 tokens, by 1.16-2.03x (perf/LOG.md v17)."""
    block_n = 64 if spec.page_size < 16 or ws_narrow(spec) or not spec.is_decode else min(64, spec.page_size)
    return block_n, 2 if block_n == 64 else 4


ALIGN_SLACK = 16
"""``DecodeConfig.align`` gives up at most 1/ALIGN_SLACK of the shares for request-aligned ones."""


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def max_block_h(spec: MLASpec) -> int:
    """The most heads one program (decode) or one tile (prefill) may hold for ``spec``: decode's tl.dot
    needs at least 16 rows, so below 16 heads it is 16."""
    return max(16, next_pow2(spec.num_heads)) if spec.is_decode else next_pow2(spec.num_heads)


def max_merge_block_h(spec: MLASpec) -> int:
    """The most heads of one stage-2 merge tile worth trying for ``spec`` (a larger tile only masks)."""
    return max(4, next_pow2(spec.num_heads))


class ConfigKeysError(ValueError):
    """A config dict whose keys are not the dataclass's fields (e.g. written by another version)."""


class _Config:
    """Shared behaviour of the config dataclasses: dict round trip with unknown keys refused."""

    _POW2: ClassVar[tuple[str, ...]] = ()
    _FLAGS: ClassVar[tuple[str, ...]] = ()
    """Fields that are 0 or 1 (a switch, not a size)."""
    _ADDED: ClassVar[dict[str, int]] = {}
    """Fields added after dispatch tables were written, with the value that keeps an older entry's behaviour."""

    def _check(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._FLAGS:
                if value not in (0, 1) or isinstance(value, bool):
                    raise ValueError(f"{type(self).__name__}.{f.name}: expected 0 or 1, found {value!r}")
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{f.name}: expected a positive int, found {value!r}")
            if f.name in self._POW2 and not _pow2(value):
                raise ValueError(f"{type(self).__name__}.{f.name}: expected a power of two, found {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__}.num_warps: expected 1, 2, 4, 8 or 16, "
                             f"found {self.num_warps}")  # type: ignore[attr-defined]

    def _check_tma(self, spec: MLASpec) -> None:
        """Bulk copies move whole tiles inside one page: tma needs block_n <= page_size, or (the
        warp-specialized kernels' paged loader) a ws config whose tile is whole pages of 8+ tokens."""
        block_n = self.block_n  # type: ignore[attr-defined]
        paged = self.ws and tile_of_pages(spec, block_n)  # type: ignore[attr-defined]
        if self.tma and not tile_in_page(spec, block_n) and not paged:
            raise ValueError(f"{type(self).__name__}.tma: bulk copies need block_n <= page_size={spec.page_size}, "
                             f"or a ws config whose tile is whole pages of 8+ tokens; found block_n={block_n}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        data = {**{k: v for k, v in cls._ADDED.items() if k not in data}, **data}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ConfigKeysError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)

    def short(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())


@dataclass(frozen=True)
class DecodeConfig(_Config):
    """Launch parameters of the split-KV decode kernel.

    block_h: heads per program (packed into the M dimension of tl.dot; at least 16).
    block_n: KV tokens per tile.
    programs_per_sm: stage-1 programs (all head groups together) per multiprocessor: the batch's page
        stream is cut into num_programs equal shares (see :meth:`num_programs`). With ws it is taken as
        1: the warp-specialized stage 1 fills a multiprocessor, so more programs would run in waves of
        equal work.
    split_tokens: the least KV tokens per share, so that small batches are not cut finer than pays
        for the merge.
    num_warps, num_stages: stage-1 warps and software-pipelining depth.
    tma: 1 copies whole KV tiles with Hopper bulk tensor copies (TMA) instead of gathering them
        element-wise; needs block_n <= page_size (a tile inside one page), or with ws a tile of whole
        pages of 8+ tokens (:func:`tile_of_pages`: the ws loader copies it page by page). Falls back to
        the gather when a cache's base or strides are not 16-byte aligned.
    ws: 1 runs stage 1 as the warp-specialized Gluon kernel on Hopper (a loader: one warp of bulk copies
        for a tile inside one page, or with tma=1 page by page for a tile of whole pages; else four warps
        gathering rows by cp.async for a tile that spans pages; one warpgroup for QK and the softmax, the
        512-wide output split over two warpgroups, so QK runs once per tile); needs a ``ws_capable`` spec
        and block_h = ``ws_block_h(spec)``. num_warps does not apply to it, nor tma where the tile lies
        inside one page. Elsewhere (other GPUs, the interpreter, tensors a bulk copy cannot
        address) the Triton stage 1 runs with the same config, without pdl.
    merge_block_h, merge_block_d, merge_num_warps: the stage-2 merge tile and warps (the tile's registers
        per thread also set how many pieces stage 2 loads at once: the generated ``merge_pieces``).
    pdl: 1 launches stage 2 as a programmatic dependent of stage 1 (sm_90+; elsewhere ignored): stage 1
        lets it launch (the warp-specialized one once its loader has issued a share's last tile, the
        Triton one at once), so its launch and prologue (finding its request; programs of requests that
        stage 1 wrote directly exit) overlap stage 1's tail, and it waits (griddepcontrol.wait) only
        before reading the scratch. The late trigger pays everywhere; the early one only where few
        merging programs wait beside stage 1 (the rule of :func:`default_decode_config`), so a ws config
        whose stage 1 falls back to the Triton kernel launches stage 2 without PDL.
    align: 1 rounds the number of shares down, by at most 1/16, to a multiple or divisor of the batch
        (host-only, see :meth:`num_programs`). With equal requests (benchmarks, fixed-length batches) the
        shares then hold whole requests or equal pieces of them: no request is cut into a sliver, and
        at batch >= shares none needs merging. With unequal requests it buys nothing and leaves up to
        1/16 of the multiprocessors idle.
    """

    block_h: int = 16
    block_n: int = 64
    programs_per_sm: int = 1
    split_tokens: int = 64
    num_warps: int = 8
    num_stages: int = 2
    tma: int = 0
    ws: int = 0
    merge_block_h: int = 16
    merge_block_d: int = 128
    merge_num_warps: int = 4
    pdl: int = 0
    align: int = 0

    _POW2: ClassVar[tuple[str, ...]] = ("block_h", "block_n", "merge_block_h", "merge_block_d")
    _FLAGS: ClassVar[tuple[str, ...]] = ("tma", "ws", "pdl", "align")
    _ADDED: ClassVar[dict[str, int]] = {"align": 0}

    def __post_init__(self) -> None:
        self._check()
        if self.block_h < 16 or self.block_n < 16:
            raise ValueError(f"DecodeConfig.block_h/block_n: expected at least 16 (tl.dot), "
                             f"found {self.block_h}/{self.block_n}")
        if self.programs_per_sm > 64:
            raise ValueError(f"DecodeConfig.programs_per_sm: expected at most 64, found {self.programs_per_sm}")

    def num_programs(self, spec: MLASpec, num_sms: int, max_tokens: int, batch: int) -> int:
        """Shares of the page stream for a batch of ``batch`` requests and at most ``max_tokens`` KV tokens
        (host-known: ``kv_indices.numel() * page_size``): about programs_per_sm programs per
        multiprocessor (one with ws) over all head groups, but no share below split_tokens tokens. With
        ``align``, the largest multiple or divisor of the batch within 1/16 below that (if any): when the
        requests are equal, every share then starts at a request boundary or cuts requests into equal
        pieces."""
        groups = -(-spec.num_heads // self.block_h)
        per_sm = 1 if self.ws else self.programs_per_sm  # one warp-specialized program fills a multiprocessor
        by_sms = max(1, per_sm * num_sms // groups)
        by_tokens = max(1, max_tokens // self.split_tokens)
        target = min(by_sms, by_tokens)
        if self.align and batch > 0:
            for n in range(target, target - target // ALIGN_SLACK - 1, -1):
                if n % batch == 0 or batch % n == 0:
                    return n
        return target

    def check_spec(self, spec: MLASpec) -> None:
        """Raise ValueError when this config cannot run ``spec``."""
        self._check_tma(spec)
        if self.ws and not (ws_capable(spec) and self.block_h == ws_block_h(spec)):
            raise ValueError(f"DecodeConfig.ws: the warp-specialized stage 1 needs heads in groups of 64 (or "
                             f"dividing 64) and block_h={ws_block_h(spec) if ws_capable(spec) else 64}; found "
                             f"{spec.name()} with block_h={self.block_h}")
        if self.ws and ws_narrow(spec) and self.block_n != 64:
            raise ValueError(f"DecodeConfig.ws: at fewer than 64 heads the warp-specialized stage 1 takes 64-token "
                             f"tiles (block_n=64); found block_n={self.block_n}")
        if self.merge_block_d > spec.head_dim_ckv:
            raise ValueError(f"DecodeConfig.merge_block_d: expected at most head_dim_ckv="
                             f"{spec.head_dim_ckv}, found {self.merge_block_d}")
        if self.block_h > max_block_h(spec):
            raise ValueError(f"DecodeConfig.block_h: expected at most {max_block_h(spec)} "
                             f"for {spec.num_heads} heads, found {self.block_h}")


@dataclass(frozen=True)
class PrefillConfig(_Config):
    """Launch parameters of the prefill kernel.

    block_m: query tokens per tile; block_h: heads per tile. The tile's block_m * block_h
    (token, head) rows form the M dimension of tl.dot (at least 16).
    block_n: KV tokens per tile. num_warps, num_stages: warps and pipelining depth.
    tma: as :class:`DecodeConfig` (for the KV tiles that every row of a query tile sees).
    ws: 1 runs the warp-specialized Gluon kernel on Hopper (as :class:`DecodeConfig`): needs a
        ``ws_capable`` spec and 64 rows (block_m * block_h) with block_h = ``ws_block_h(spec)`` =
        min(heads, 64); num_warps does not apply to it, nor tma where the tile lies inside one page.
    """

    block_m: int = 4
    block_h: int = 16
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    tma: int = 0
    ws: int = 0

    _POW2: ClassVar[tuple[str, ...]] = ("block_m", "block_h", "block_n")
    _FLAGS: ClassVar[tuple[str, ...]] = ("tma", "ws")

    def __post_init__(self) -> None:
        self._check()
        if self.block_m * self.block_h < 16 or self.block_n < 16:
            raise ValueError(f"PrefillConfig: block_m * block_h and block_n must be at least 16 (tl.dot), "
                             f"found {self.block_m * self.block_h} and {self.block_n}")

    def check_spec(self, spec: MLASpec) -> None:
        self._check_tma(spec)
        if self.ws and not (ws_capable(spec) and self.block_h == ws_block_h(spec) and self.rows == 64):
            raise ValueError(f"PrefillConfig.ws: the warp-specialized kernel needs 64 rows of block_h="
                             f"{min(spec.num_heads, 64)} heads; found {spec.name()} with block_m={self.block_m}, "
                             f"block_h={self.block_h}")
        if self.block_h > max_block_h(spec):
            raise ValueError(f"PrefillConfig.block_h: expected at most {max_block_h(spec)} "
                             f"for {spec.num_heads} heads, found {self.block_h}")

    @property
    def rows(self) -> int:
        return self.block_m * self.block_h


Config = DecodeConfig | PrefillConfig
"""A launch config of either variant."""


def default_decode_config(spec: MLASpec, batch: int, avg_kv_len: float, num_sms: int,
                          hopper: bool = True) -> DecodeConfig:
    """A sensible decode config without tuning: 8 warps, 64-token tiles double-buffered (3 stages), one
    wave of balanced shares; at more than 32 heads 64 heads per program (wgmma; the KV is read once per
    64 heads) with 32-token tiles; tiles by bulk tensor copies whenever a tile fits in a page; on a Hopper
    (``hopper``), the warp-specialized stage 1 wherever the spec allows it (64-token tiles, 2 stages). Over an
    fp8 cache: 64-token tiles, 4 stages below 64 heads per program and 3 at 64 (the best of the H200 sweeps
    in perf/LOG.md v16; an fp8 tile is half the shared memory of a 16-bit one)."""
    block_h = ws_block_h(spec)  # 16, 32 or 64 heads per program
    block_n = 64 if block_h <= 32 or spec.fp8 else 32
    num_stages, ws = (4 if block_h <= 32 else 3) if spec.fp8 else 3, 0
    if hopper and ws_capable(spec):
        (block_n, num_stages), ws = ws_tiles(spec), 1
    # The merge tile: 4 heads x 128 columns keeps a small batch's few merges spread over many programs; from
    # 64 heads up and above 16 requests, 8 heads x the whole row (fewer, fuller merge programs). Up to 16
    # requests of up to 2048 tokens, shares of at least 128 tokens (fewer pieces to merge). What the H200
    # catalogue tune chose on its b1-16_kv1-2k bucket: 128+ tokens at 15 of 20 shapes, a 4-head merge tile at
    # 18; the tuned configs were 1.10-2.01x faster than the 64-token, 8-head default (perf/LOG.md v17).
    wide_merge = spec.num_heads >= 64 and batch > 16
    split_tokens = 128 if batch <= 16 and avg_kv_len <= 2048 else 64
    # Programmatic dependent launch (ignored below sm_90). The warp-specialized stage 1 lets stage 2 launch
    # only once its loader is done: always. The Triton stage 1 lets it launch at its start, which pays only
    # where few merging programs would wait beside it: from 64 heads, batches of at least half the
    # multiprocessors, or at most 64 tokens per multiprocessor (no more shares than multiprocessors).
    few_waiting = spec.num_heads >= 64 or 2 * batch >= num_sms or batch * avg_kv_len <= num_sms * 64
    pdl = int(hopper and (ws == 1 or few_waiting))
    return DecodeConfig(
        block_h=block_h, block_n=block_n, programs_per_sm=1, split_tokens=split_tokens,
        num_warps=8, num_stages=num_stages, tma=int(tile_in_page(spec, block_n)), ws=ws,
        merge_block_h=8 if wide_merge else min(4, next_pow2(spec.num_heads)),
        merge_block_d=spec.head_dim_ckv if wide_merge else min(128, spec.head_dim_ckv),
        merge_num_warps=4, pdl=pdl, align=1,
    )


def default_prefill_config(spec: MLASpec, hopper: bool = True) -> PrefillConfig:
    """64 rows of up to 16 heads, 64-token KV tiles, 2 stages (3 over an fp8 cache: the H200 sweep's best,
    perf/LOG.md v16), bulk copies where a tile fits in a page; on a Hopper (``hopper``) the
    warp-specialized kernel wherever the spec allows it (block_h becomes min(heads, 64))."""
    block_h, block_n = min(16, next_pow2(spec.num_heads)), 64
    if hopper and ws_capable(spec):
        block_h, (block_n, num_stages) = ws_block_h(spec), ws_tiles(spec)
        return PrefillConfig(block_m=64 // block_h, block_h=block_h, block_n=block_n, num_warps=8,
                             num_stages=num_stages, tma=int(tile_in_page(spec, block_n)), ws=1)
    return PrefillConfig(block_m=max(1, 64 // block_h), block_h=block_h, block_n=block_n,
                         num_warps=8, num_stages=3 if spec.fp8 else 2, tma=int(tile_in_page(spec, block_n)))
