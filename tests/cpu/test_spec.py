"""Specialization keys and launch configs: canonical names, their inverse, validation."""

from __future__ import annotations

import dataclasses

import pytest

from tuner import DecodeConfig, MLASpec, PrefillConfig, catalogue
from tuner.runtime.config import default_decode_config, default_prefill_config


def test_catalogue_contents() -> None:
    specs = catalogue()
    assert len(specs) == len(set(specs)) == 2 * 3 * (5 * 4 + 2)  # each shape over a 16-bit and an fp8 cache
    assert sum(s.fp8 for s in specs) == len(specs) // 2
    assert specs == sorted(specs)
    assert {s.variant for s in specs} == {"decode", "prefill_causal", "prefill"}
    assert {s.num_heads for s in specs} == {8, 16, 32, 64, 128}
    assert {s.page_size for s in specs} == {1, 16, 32, 64}
    assert MLASpec("decode", 16, 256, 32, 64) in specs and MLASpec("prefill", 16, 256, 32, 1) in specs


def test_canonical_names() -> None:
    assert MLASpec("decode", 16, 512, 64, 1).name() == "mla_paged_decode_h16_ckv512_kpe64_ps1"
    assert MLASpec("prefill_causal", 16, 512, 64, 64).name() == "mla_paged_prefill_causal_h16_ckv512_kpe64_ps64"
    assert MLASpec("prefill", 128, 256, 32, 16).name() == "mla_paged_prefill_h128_ckv256_kpe32_ps16"
    assert str(MLASpec("decode", 8, 512, 64, 32)) == "mla_paged_decode_h8_ckv512_kpe64_ps32"


@pytest.mark.parametrize("spec", catalogue(), ids=str)
def test_name_round_trip(spec: MLASpec) -> None:
    assert MLASpec.from_name(spec.name()) == spec


def test_name_round_trip_outside_catalogue() -> None:
    spec = MLASpec("prefill_causal", 24, 1024, 128, 128)
    assert MLASpec.from_name(spec.name()) == spec
    assert MLASpec.from_name(spec.name()).causal and not MLASpec.from_name(spec.name()).is_decode


@pytest.mark.parametrize("name", [
    "",
    "mla_paged_decode_h16_ckv512_kpe64",  # no page size
    "mla_paged_decode_h16_ckv512_kpe64_ps1.py",  # a file name, not a name
    "mla_paged_encode_h16_ckv512_kpe64_ps1",  # unknown variant
    "mla_paged_prefill_noncausal_h16_ckv512_kpe64_ps1",
    "mla_paged_decode_h016_ckv512_kpe64_ps1",  # leading zero
    "mla_paged_decode_h0_ckv512_kpe64_ps1",
    "mla_paged_decode_h-16_ckv512_kpe64_ps1",
    "mla_paged_decode_h16_ckv500_kpe64_ps1",  # not a power of two
    "mla_paged_decode_h16_ckv512_kpe64_ps12",
    "mla_paged_decode_h16_ckv8_kpe64_ps1",  # below the tl.dot minimum
    "MLA_PAGED_DECODE_H16_CKV512_KPE64_PS1",
    " mla_paged_decode_h16_ckv512_kpe64_ps1",
    "mla_paged_decode_h16_ckv512_kpe64_ps1\n",
    "mla_paged_decode_ckv512_h16_kpe64_ps1",  # wrong order
])
def test_malformed_names_raise(name: str) -> None:
    with pytest.raises(ValueError, match="name|head_dim|page_size|num_heads"):
        MLASpec.from_name(name)


@pytest.mark.parametrize(("args", "pattern"), [
    (("decoder", 16, 512, 64, 1), "^variant"),
    (("decode", 0, 512, 64, 1), "^num_heads"),
    (("decode", 16.0, 512, 64, 1), "^num_heads"),
    (("decode", True, 512, 64, 1), "^num_heads"),
    (("decode", 16, 384, 64, 1), "^head_dim_ckv: expected a power of two, found 384"),
    (("decode", 16, 512, 48, 1), "^head_dim_kpe"),
    (("decode", 16, 512, 64, 3), "^page_size: expected a power of two, found 3"),
    (("decode", 16, 512, 8, 1), "head_dim_kpe"),
])
def test_spec_validation(args: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MLASpec(*args)


def test_spec_is_frozen_and_hashable() -> None:
    spec = MLASpec("decode", 16, 512, 64, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_heads = 32  # type: ignore[misc]
    assert {spec: 1}[MLASpec("decode", 16, 512, 64, 1)] == 1


@pytest.mark.parametrize("cls", [DecodeConfig, PrefillConfig])
def test_config_dict_round_trip_refuses_unknown_keys(cls) -> None:
    config = cls()
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        cls.from_dict({**config.to_dict(), "bogus": 1})
    data = config.to_dict()
    missing = data.pop("block_n")
    assert missing
    with pytest.raises(ValueError, match=r"missing keys \['block_n'\]"):
        cls.from_dict(data)


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda: DecodeConfig(block_h=8), "block_h"),
    (lambda: DecodeConfig(block_n=24), r"block_n: expected a power of two, found 24"),
    (lambda: DecodeConfig(num_warps=3), "num_warps"),
    (lambda: DecodeConfig(split_tokens=0), "split_tokens"),
    (lambda: DecodeConfig(programs_per_sm=65), "programs_per_sm"),
    (lambda: DecodeConfig(pdl=2), r"pdl: expected 0 or 1"),
    (lambda: PrefillConfig(block_m=1, block_h=8), "at least 16"),
    (lambda: PrefillConfig(block_n=8), "at least 16"),
    (lambda: PrefillConfig(block_m=3), "block_m"),
])
def test_config_validation(make, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize("spec", catalogue(), ids=str)
def test_default_configs_fit_every_catalogue_spec(spec: MLASpec) -> None:
    config = default_decode_config(spec, 8, 1000.0, 132) if spec.is_decode else default_prefill_config(spec)
    config.check_spec(spec)


@pytest.mark.parametrize("heads, batch, kv, hopper, pdl", [
    (16, 1, 1024, True, 1),
    (16, 128, 2048, True, 1),
    (16, 32, 4096, True, 1),     # long requests split many ways: paid too once the trigger came late (v8)
    (16, 16, 32768, True, 1),
    (128, 32, 4096, True, 1),
    (128, 1, 1024, False, 0),    # not a Hopper: no programmatic dependent launch
    # no warp-specialized stage 1 for 24 heads: the Triton one lets stage 2 launch at its start (v7 rule)
    (24, 1, 1024, True, 1),
    (24, 128, 2048, True, 1),
    (24, 32, 4096, True, 0),
])
def test_default_pdl(heads: int, batch: int, kv: int, hopper: bool, pdl: int) -> None:
    """The default's stage-2 launch mode follows the H200 measurements of perf/LOG.md: on a Hopper with the
    warp-specialized stage 1 (v8, its late trigger); with the Triton stage 1 where few merging programs wait (v7)."""
    assert default_decode_config(MLASpec("decode", heads, 512, 64, 64), batch, kv, 132, hopper=hopper).pdl == pdl


def test_default_merge_tile_by_heads() -> None:
    """From 64 heads the merge tile is 8 heads x the whole row (v7); below, 4 heads x 128 columns."""
    wide = default_decode_config(MLASpec("decode", 128, 512, 64, 64), 32, 4096, 132)
    narrow = default_decode_config(MLASpec("decode", 16, 512, 64, 64), 32, 4096, 132)
    assert (wide.merge_block_h, wide.merge_block_d) == (8, 512)
    assert (narrow.merge_block_h, narrow.merge_block_d) == (4, 128)
