"""Search spaces: each kernel's tunable launch parameters as data, and a feasibility predicate.

A :class:`Space` is a small table of categorical choices per parameter (every parameter is a field of
:class:`~tuner.runtime.config.DecodeConfig` / :class:`~tuner.runtime.config.PrefillConfig`, except prefill's ``rows``,
the M dimension ``block_m * block_h`` of its tl.dot, which is searched instead of ``block_m``). The
default config of a shape is always in the space (its values are added to the choices), so the tuner
can try it first. Fields that are not searched take the default's value.

:func:`check` is the feasibility predicate that prunes a candidate before it is compiled, by the
resource model of :mod:`tuner.runtime.resources`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tuner.runtime.config import Config, DecodeConfig, PrefillConfig, max_block_h, max_merge_block_h, ws_capable
from tuner.runtime.device import H100_SHARED_BYTES
from tuner.runtime.resources import infeasible
from tuner.runtime.spec import MLASpec

DECODE_CHOICES: dict[str, tuple[int, ...]] = {
    "block_h": (16, 32, 64),
    "block_n": (16, 32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
    "tma": (0, 1),
    "ws": (0, 1),
    "programs_per_sm": (1, 2, 3, 4),
    "split_tokens": (64, 128, 256, 512, 1024, 2048, 4096),
    "merge_block_h": (4, 8, 16, 32),
    "merge_block_d": (64, 128, 256, 512),
    "merge_num_warps": (2, 4, 8),
    "pdl": (0, 1),
}
"""Candidate values of the decode kernel's parameters. ``align`` is not searched (fixed at the default's 1):
the buckets' representative batches have unequal requests, where aligned shares cannot show their gain,
so the search would keep or drop it at random (H200: a study that dropped it lost 6% on d-b128-2k)."""

PREFILL_CHOICES: dict[str, tuple[int, ...]] = {
    "rows": (16, 32, 64, 128),
    "block_h": (2, 4, 8, 16, 32, 64),
    "block_n": (16, 32, 64),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
    "tma": (0, 1),
    "ws": (0, 1),
}
"""Candidate values of the prefill kernel's parameters (block_m = rows // block_h). Four stages fit the
warp-specialized kernel's tiles of 16 or 32 tokens (one page each at those page sizes)."""


@dataclass(frozen=True)
class Limits:
    """What one program may use on the target GPU.

    shared_bytes: shared memory per block (opt-in maximum); itemsize: bytes per element of q and the
    KV cache (the tuner tunes bf16).
    """

    shared_bytes: int = H100_SHARED_BYTES
    itemsize: int = 2


@dataclass(frozen=True)
class Param:
    """One searched parameter and its categorical choices."""

    name: str
    choices: tuple[int, ...]


@dataclass(frozen=True)
class Space:
    """The search space of one kernel specialization.

    params: the searched parameters; fixed: (field, value) pairs of the config that are not searched.
    """

    spec: MLASpec
    params: tuple[Param, ...]
    fixed: tuple[tuple[str, int], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def size(self) -> int:
        """Points in the grid (feasible or not)."""
        n = 1
        for p in self.params:
            n *= len(p.choices)
        return n

    def grid(self) -> Iterator[dict[str, int]]:
        """Every point of the grid, in a fixed order."""
        for values in itertools.product(*(p.choices for p in self.params)):
            yield dict(zip(self.names, values, strict=True))

    def values_of(self, config: Config) -> dict[str, int]:
        """The parameter values of ``config`` (the inverse of :meth:`to_config`)."""
        data = config.to_dict()
        if isinstance(config, PrefillConfig):
            data["rows"] = config.block_m * config.block_h
        return {name: data[name] for name in self.names}

    def contains(self, config: Config) -> bool:
        values = self.values_of(config)
        fixed_ok = all(config.to_dict()[k] == v for k, v in self.fixed)
        return fixed_ok and all(values[p.name] in p.choices for p in self.params)

    def to_config(self, values: Mapping[str, int]) -> Config:
        """Build the config of a point; ValueError if the point is not a valid config."""
        missing = sorted(set(self.names) - set(values))
        if missing:
            raise ValueError(f"values: missing parameters {missing}")
        data = dict(self.fixed)
        data.update({k: int(values[k]) for k in self.names})
        if self.spec.is_decode:
            config: Config = DecodeConfig.from_dict(data)
        else:
            if "rows" in data:  # searched instead of block_m
                rows, block_h = data.pop("rows"), data["block_h"]
                if rows % block_h:
                    raise ValueError(f"rows: expected a multiple of block_h={block_h}, found {rows}")
                data["block_m"] = rows // block_h
            config = PrefillConfig.from_dict(data)
        config.check_spec(self.spec)
        return config


def _choices(table: Mapping[str, tuple[int, ...]], default: Mapping[str, int],
             keep: Mapping[str, int]) -> tuple[Param, ...]:
    """Params from a choices table, each capped at keep[name] (if given) and always holding the default."""
    params = []
    for name, values in table.items():
        cap = keep.get(name)
        chosen = {v for v in values if cap is None or v <= cap} | {default[name]}
        params.append(Param(name, tuple(sorted(chosen))))
    return tuple(params)


def decode_space(spec: MLASpec, default: DecodeConfig) -> Space:
    """The decode search space of ``spec`` around its default config ``default``."""
    if not spec.is_decode:
        raise ValueError(f"spec: expected a decode spec, found {spec.name()}")
    caps = {"block_h": max_block_h(spec), "merge_block_d": spec.head_dim_ckv,
            "merge_block_h": max_merge_block_h(spec),
            "tma": int(spec.page_size > 1), "ws": int(ws_capable(spec))}
    params = _choices(DECODE_CHOICES, default.to_dict(), caps)
    searched = {p.name for p in params}
    fixed = tuple((k, v) for k, v in default.to_dict().items() if k not in searched)
    return Space(spec, params, fixed)


def prefill_space(spec: MLASpec, default: PrefillConfig) -> Space:
    """The prefill search space of ``spec`` around its default config ``default``."""
    if spec.is_decode:
        raise ValueError(f"spec: expected a prefill spec, found {spec.name()}")
    values = dict(default.to_dict(), rows=default.block_m * default.block_h)
    params = _choices(PREFILL_CHOICES, values, {"block_h": max_block_h(spec),
                                                "tma": int(spec.page_size > 1), "ws": int(ws_capable(spec))})
    return Space(spec, params, ())


def space_for(spec: MLASpec, default: Config) -> Space:
    if spec.is_decode:
        if not isinstance(default, DecodeConfig):
            raise TypeError(f"default: expected a DecodeConfig for {spec.name()}, found {type(default).__name__}")
        return decode_space(spec, default)
    if not isinstance(default, PrefillConfig):
        raise TypeError(f"default: expected a PrefillConfig for {spec.name()}, found {type(default).__name__}")
    return prefill_space(spec, default)


def check(spec: MLASpec, config: Config, limits: Limits = Limits()) -> str | None:
    """Why ``config`` cannot run well on ``spec`` under ``limits``, or None when it is feasible (the
    runtime's rule, :func:`tuner.runtime.resources.infeasible`, which the derived configs obey too)."""
    return infeasible(spec, config, limits.shared_bytes, limits.itemsize)


def check_values(space: Space, values: Mapping[str, int], limits: Limits = Limits()
                 ) -> tuple[Config | None, str | None]:
    """(config, None) for a feasible point of ``space``, else (None or the config, the reason)."""
    try:
        config = space.to_config(values)
    except ValueError as err:
        return None, str(err)
    return config, check(space.spec, config, limits)


def feasible_grid(space: Space, limits: Limits = Limits()) -> list[dict[str, int]]:
    """The feasible points of the whole grid (for an exhaustive sweep)."""
    return [v for v in space.grid() if check_values(space, v, limits)[1] is None]


_SHORT = {
    "block_h": "h", "block_n": "n", "block_m": "m", "programs_per_sm": "p", "split_tokens": "s",
    "num_warps": "w", "num_stages": "st", "merge_block_h": "mh", "merge_block_d": "md",
    "merge_num_warps": "mw", "tma": "t", "ws": "ws", "pdl": "pdl",
}


def compact(config: Config) -> str:
    """A short one-line form for tables: ``h16 n64 p1 s256 w8 st2 mh16 md128 mw4``."""
    return " ".join(f"{_SHORT.get(k, k)}{v}" for k, v in config.to_dict().items())
