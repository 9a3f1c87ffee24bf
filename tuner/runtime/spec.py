"""Specializations: what a generated kernel module is specialized on, and its canonical name.

One name per specialization, made by :meth:`MLASpec.name` and parsed back by :meth:`MLASpec.from_name`.
It is the generated file's name, the dispatch-table key and the tuning study's name. The order follows
FlashInfer-Bench: ``mla_paged_decode_h16_ckv512_kpe64_ps1``,
``mla_paged_prefill_causal_h16_ckv512_kpe64_ps64``.

The element type of a 16-bit cache is not part of the name: one module serves bf16 and fp16 (and fp32,
for tests), since Triton specializes on pointer types when it compiles. An fp8 cache (float8_e4m3fn with
per-tensor scales) is a structural change, its own module: the name ends in ``_fp8e4m3``
(``mla_paged_decode_h16_ckv512_kpe64_ps64_fp8e4m3``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Variant = Literal["decode", "prefill_causal", "prefill"]

VARIANTS: tuple[Variant, ...] = ("decode", "prefill_causal", "prefill")
"""``prefill_causal`` is the causal prefill; ``prefill`` is the non-causal mode of the same template."""

_NAME_RE = re.compile(
    r"^mla_paged_(?P<variant>decode|prefill_causal|prefill)"
    r"_h(?P<heads>[1-9][0-9]*)_ckv(?P<ckv>[1-9][0-9]*)_kpe(?P<kpe>[1-9][0-9]*)_ps(?P<ps>[1-9][0-9]*)"
    r"(?P<fp8>_fp8e4m3)?$"
)

FP8_SUFFIX = "_fp8e4m3"
"""The name suffix of a module over an fp8 (float8_e4m3fn) cache."""


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True, order=True)
class MLASpec:
    """The specialization key of one generated module.

    Attributes:
        variant: ``"decode"``, ``"prefill_causal"`` or ``"prefill"`` (non-causal).
        num_heads: query heads per token (``num_qo_heads``).
        head_dim_ckv: width of the compressed KV vector (also the value and output width).
        head_dim_kpe: width of the rotary key part.
        page_size: tokens per page of the paged cache.
        fp8: the cache is float8_e4m3fn with per-tensor scales (``ckv_scale``, ``kpe_scale``); the queries
            and the output stay 16-bit. False: a bf16/fp16 cache, the queries' dtype.
    """

    variant: Variant
    num_heads: int
    head_dim_ckv: int
    head_dim_kpe: int
    page_size: int
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, found {self.variant!r}")
        for field in ("num_heads", "head_dim_ckv", "head_dim_kpe", "page_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}: expected a positive int, found {value!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8: expected a bool, found {self.fp8!r}")
        # Triton block shapes are powers of two; the head dims are loaded whole as one block.
        for field in ("head_dim_ckv", "head_dim_kpe", "page_size"):
            value = getattr(self, field)
            if not _is_pow2(value):
                raise ValueError(f"{field}: expected a power of two, found {value}")
        if self.head_dim_ckv < 16 or self.head_dim_kpe < 16:
            raise ValueError(
                "head_dim_ckv/head_dim_kpe: expected at least 16 (the tl.dot minimum), "
                f"found {self.head_dim_ckv}/{self.head_dim_kpe}"
            )

    @property
    def causal(self) -> bool:
        return self.variant == "prefill_causal"

    @property
    def is_decode(self) -> bool:
        return self.variant == "decode"

    @property
    def template(self) -> str:
        """The template file this specialization is rendered from."""
        return "mla_decode.py.jinja" if self.is_decode else "mla_prefill.py.jinja"

    def name(self) -> str:
        return (
            f"mla_paged_{self.variant}_h{self.num_heads}_ckv{self.head_dim_ckv}"
            f"_kpe{self.head_dim_kpe}_ps{self.page_size}{FP8_SUFFIX if self.fp8 else ''}"
        )

    @classmethod
    def from_name(cls, name: str) -> MLASpec:
        """Parse a canonical name back into its spec; the inverse of :meth:`name`."""
        match = _NAME_RE.match(name)
        if match is None:
            raise ValueError(
                f"name: expected 'mla_paged_<variant>_h<H>_ckv<C>_kpe<K>_ps<P>[{FP8_SUFFIX}]', found {name!r}"
            )
        spec = cls(
            variant=match["variant"],  # type: ignore[arg-type]
            num_heads=int(match["heads"]),
            head_dim_ckv=int(match["ckv"]),
            head_dim_kpe=int(match["kpe"]),
            page_size=int(match["ps"]),
            fp8=match["fp8"] is not None,
        )
        if spec.name() != name:  # leading zeros and the like
            raise ValueError(f"name: {name!r} is not canonical (expected {spec.name()!r})")
        return spec

    def __str__(self) -> str:
        return self.name()


CATALOGUE_HEADS = (8, 16, 32, 64, 128)
CATALOGUE_PAGE_SIZES = (1, 16, 32, 64)


def catalogue() -> list[MLASpec]:
    """The built-in catalogue that ``mla-tune generate`` renders (``docs/contract.md``): every shape with a
    16-bit cache and with an fp8 one."""
    shapes: list[tuple[int, int, int, int]] = [
        (h, 512, 64, ps) for h in CATALOGUE_HEADS for ps in CATALOGUE_PAGE_SIZES
    ]
    shapes += [(16, 256, 32, ps) for ps in (1, 64)]
    return sorted(
        MLASpec(variant, h, ckv, kpe, ps, fp8)
        for variant in VARIANTS for (h, ckv, kpe, ps) in shapes for fp8 in (False, True)
    )
