"""Configs for untuned shapes derived from the nearest tuned ones (tuner.runtime.derive, through
tuner.runtime.dispatch.select): which neighbour, how its config is adapted, that the result is legal for
every catalogue shape, stale hashes, the fallback to the default, and that it is cached."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from helpers import own_generated_dir, tuned_entry

from tuner.runtime import derive, dispatch
from tuner.runtime.buckets import buckets_for, by_name
from tuner.runtime.config import (
    DecodeConfig,
    PrefillConfig,
    default_prefill_config,
    ws_block_h,
    ws_tiles,
)
from tuner.runtime.device import GPUInfo
from tuner.runtime.loader import module_hash
from tuner.runtime.resources import infeasible
from tuner.runtime.spec import MLASpec, catalogue
from tuner.tuning import representative
from tuner.tuning.space import check, space_for

REPO_GENERATED = Path(__file__).resolve().parents[2] / "generated"
H200 = GPUInfo(key="nvidia-h200", name="NVIDIA H200", capability="9.0", num_sms=132)
H100 = GPUInfo(key="nvidia-h100-80gb-hbm3", name="NVIDIA H100 80GB HBM3", capability="9.0", num_sms=132)
A100 = GPUInfo(key="nvidia-a100-sxm4-80gb", name="NVIDIA A100-SXM4-80GB", capability="8.0", num_sms=108)


def spec(variant: str = "decode", heads: int = 16, ps: int = 64, ckv: int = 512, kpe: int = 64) -> MLASpec:
    return MLASpec(variant, heads, ckv, kpe, ps)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield own_generated_dir(tmp_path, monkeypatch)
    dispatch.reload()


entry = tuned_entry


def select(target: MLASpec, bucket: str, gpu: GPUInfo = H200) -> tuple[dispatch.Config, str, list[str]]:
    b = by_name("decode" if target.is_decode else "prefill", bucket)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, name, source = dispatch.select(target, b.rows[0] + 1, b.kv[0] + 1.0, gpu)
    assert name == bucket
    return config, source, [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]


def marked(split_tokens: int, **kw: int) -> DecodeConfig:
    """A legal 16-head decode config told apart from the others by its split floor."""
    return DecodeConfig(**{"block_h": 16, "block_n": 64, "num_warps": 8, "num_stages": 2, "tma": 0, "ws": 0,
                           "merge_block_h": 4, "merge_block_d": 128, "align": 1, "split_tokens": split_tokens, **kw})


# -- which neighbour ------------------------------------------------------------------------------------


def test_nearest_head_count_then_page_size_then_bucket() -> None:
    bucket = "b17-96_kv2k+"
    dispatch.merge(H200, {(spec(ps=64).name(), bucket): entry(marked(128), spec(ps=64)),
                          (spec(ps=1).name(), bucket): entry(marked(256), spec(ps=1)),
                          (spec(heads=128, ps=64).name(), bucket): entry(marked(512), spec(heads=128, ps=64)),
                          (spec(ps=64).name(), "b17-96_kv1-2k"): entry(marked(1024), spec(ps=64))})
    config, source, warned = select(spec(heads=32, ps=16), bucket)  # 16 heads is nearer than 128; ps 64 than 1
    assert source == f"derived from {spec(ps=64).name()} (bucket {bucket})"
    assert config.split_tokens == 128 and config.block_h == 16
    assert len(warned) == 1 and source in warned[0] and "mla-tune tune --heads 32 --page-size 16" in warned[0]
    config, source, _ = select(spec(heads=64, ps=64), bucket)  # 128 heads: a factor 2, 16 a factor 4
    assert config.split_tokens == 512 and spec(heads=128, ps=64).name() in source
    config, source, _ = select(spec(ps=32), "b17-96_kv1-2k")  # the same bucket of a near shape
    assert config.split_tokens == 1024
    config, source, _ = select(spec(ps=32), "b1-16_kv2k+")  # no entry of that bucket: the nearest bucket
    assert config.split_tokens == 128 and source.endswith(f"(bucket {bucket})")
    config, source, _ = select(spec(ps=64), "b97+_kv2k+")  # a tuned shape's other bucket: its own nearest bucket
    assert config.split_tokens == 128 and source == f"derived from {spec(ps=64).name()} (bucket {bucket})"


def test_neighbours_order_is_deterministic_and_by_variant() -> None:
    kernels = {spec(heads=h, ps=ps).name(): {b.name: entry(marked(64), spec(heads=h, ps=ps))
                                              for b in buckets_for(spec())}
               for h in (16, 128) for ps in (1, 64)}
    kernels[spec("prefill_causal").name()] = {"q1-256": entry(PrefillConfig(), spec("prefill_causal"))}
    target, bucket = spec(heads=64, ps=16), by_name("decode", "b97+_kv1-2k")
    found = derive.neighbours(target, bucket, kernels)
    assert all(s.is_decode for s, _, _ in found) and len(found) == 4 * 6
    assert (found[0][0], found[0][1].name) == (spec(heads=128, ps=64), "b97+_kv1-2k")
    backwards = derive.neighbours(target, bucket, dict(reversed(kernels.items())))
    assert [(s.name(), b.name) for s, b, _ in found] == [(s.name(), b.name) for s, b, _ in backwards]
    assert derive.bucket_distance(bucket, by_name("decode", "b97+_kv2k+")) == (0, 1)
    assert derive.bucket_distance(by_name("prefill", "q1-256"), by_name("prefill", "q2k+_kv2k+")) == (2, 1)


# -- adapting --------------------------------------------------------------------------------------------


def test_adapt_redoes_what_depends_on_heads_and_page_size() -> None:
    b = by_name("decode", "b17-96_kv2k+")
    # Bulk copies: dropped where the tile spans pages; taken where the source had no choice (page size 1).
    src = DecodeConfig(block_h=16, block_n=32, num_warps=4, num_stages=4, tma=1, split_tokens=256, merge_block_h=4)
    got = derive.adapt(src, spec(heads=128, ps=64), spec(heads=64, ps=16), b, H200)
    assert got is not None and got.tma == 0 and got.block_n == 32 and got.split_tokens == 256
    got = derive.adapt(DecodeConfig(block_n=64, tma=0), spec(ps=1), spec(ps=64), b, H200)
    assert got is not None and got.tma == 1
    # The warp-specialized kernel: its heads per program, 64-token tiles below 64 heads, one program per SM.
    ws16 = DecodeConfig(block_h=16, block_n=64, num_stages=2, tma=1, ws=1, pdl=1, merge_block_h=4, align=1)
    got = derive.adapt(ws16, spec(ps=64), spec(heads=128, ps=16), b, H200)
    assert got is not None and got.ws == 1 and got.block_h == ws_block_h(spec(heads=128, ps=16)) == 64
    assert (got.block_n, got.num_stages) == ws_tiles(spec(heads=128, ps=16)) == (16, 4) and got.tma == 1
    ws128 = DecodeConfig(block_h=64, block_n=16, num_stages=4, ws=1, pdl=1, programs_per_sm=1, merge_block_h=8,
                         merge_block_d=512)
    got = derive.adapt(ws128, spec(heads=128, ps=16), spec(heads=8, ps=16), b, H200)
    assert got is not None and (got.block_h, got.block_n, got.merge_block_h) == (16, 64, 8)
    # Heads per program within the spec's bound; the merge tile within the head dims.
    wide = DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, merge_block_h=32, merge_block_d=512)
    got = derive.adapt(wide, spec(heads=128), spec(ckv=256, kpe=32), b, H200)
    assert got is not None and (got.block_h, got.merge_block_h, got.merge_block_d) == (16, 16, 256)


def test_adapt_prefill_keeps_the_tile_rows_and_the_kernel_kind() -> None:
    b = by_name("prefill", "q257-2k")
    source = spec("prefill_causal", ps=64)
    triton = PrefillConfig(block_m=4, block_h=16, block_n=64, num_warps=8, num_stages=2, tma=1)
    got = derive.adapt(triton, source, spec("prefill_causal", heads=8, ps=32), b, H200)
    assert got is not None and (got.block_m, got.block_h, got.tma, got.ws) == (8, 8, 0, 0)
    ws = PrefillConfig(block_m=4, block_h=16, block_n=32, num_warps=8, num_stages=2, tma=1, ws=1)
    got = derive.adapt(ws, source, spec("prefill_causal", heads=128, ps=32), b, H200)
    assert got is not None and (got.block_m, got.block_h, got.block_n, got.num_stages, got.ws) == (1, 64, 32, 2, 1)
    assert derive.adapt(ws, source, spec("decode"), b, H200) is None


def test_adapt_shrinks_to_a_smaller_gpu_or_gives_up() -> None:
    small = GPUInfo(key="small", name="small", capability="8.0", num_sms=40, shared_bytes=101376)
    b = by_name("decode", "b1-16_kv1-2k")
    big = DecodeConfig(block_h=16, block_n=128, num_warps=8, num_stages=4, merge_block_h=4)
    got = derive.adapt(big, spec(ps=1), spec(heads=32, ps=1), b, small)
    assert got is not None and infeasible(spec(heads=32, ps=1), got, small.shared_bytes) is None
    assert got.num_stages < 4 or got.block_n < 128
    tiny = GPUInfo(key="tiny", name="tiny", capability="8.0", num_sms=4, shared_bytes=8192)
    assert derive.adapt(big, spec(ps=1), spec(heads=32, ps=1), b, tiny) is None


# -- the committed table -----------------------------------------------------------------------------------


@pytest.fixture
def committed(generated: Path) -> dispatch.Table:
    """The committed H200 table, its entries stamped with the modules' current hashes (so that the test
    sees the derivation even when a template change has left the committed entries stale)."""
    table = dispatch.load_table(REPO_GENERATED / "dispatch" / "nvidia-h200.json")
    data = json.loads(table.to_json())
    for kernel, entries in data["kernels"].items():
        for e in entries.values():
            e["kernel_hash"] = module_hash(MLASpec.from_name(kernel))
    (generated / "dispatch" / "nvidia-h200.json").write_text(json.dumps(data))
    dispatch.reload()
    return table


def test_every_catalogue_shape_gets_a_legal_config_from_the_committed_table(committed: dispatch.Table) -> None:
    sources = {"tuned": 0, "derived": 0, "default": 0}
    for target in catalogue():
        for b in buckets_for(target):
            config, source, _ = select(target, b.name)
            assert infeasible(target, config, H200.shared_bytes) is None, (target.name(), b.name, source)
            w = representative.workload(b, target)
            default = dispatch.untuned_config(target, w.total_q, w.avg_kv_len, H200)
            assert space_for(target, default).contains(config), (target.name(), b.name, config)
            assert check(target, config) is None
            kind = source.split()[0]
            sources[kind] += 1
            tuned = committed.entry(target.name(), b.name)
            if tuned is not None:
                assert kind == "tuned" and config == tuned.config
            elif target.variant != "prefill":  # decode and causal prefill have tuned neighbours
                assert kind == "derived", (target.name(), b.name, source)
            else:  # nobody tuned the non-causal prefill: the default
                assert source == "default"
    assert sources["tuned"] == sum(len(e) for e in committed.kernels.values())
    # every shape with a 16-bit and with an fp8 cache (the fp8 kernels derive from 16-bit neighbours while
    # none of them is tuned)
    assert sources["derived"] == 2 * (22 * 6 + 22 * 4) - sources["tuned"]


def test_a_stale_neighbour_is_passed_over_and_no_neighbour_means_the_default() -> None:
    bucket = "b1-16_kv1-2k"
    dispatch.merge(H200, {(spec(ps=64).name(), bucket): entry(marked(128), spec(ps=64), kernel_hash="0" * 16),
                          (spec(ps=1).name(), bucket): entry(marked(256), spec(ps=1))})
    config, source, _ = select(spec(ps=32), bucket)
    assert config.split_tokens == 256 and spec(ps=1).name() in source  # the nearer one is stale
    dispatch.merge(H200, {(spec(ps=1).name(), bucket): entry(marked(256), spec(ps=1), kernel_hash="1" * 16)})
    config, source, warned = select(spec(ps=32), bucket)
    assert source == "default" and config == dispatch.untuned_config(spec(ps=32), 1, 1.0, H200)
    assert len(warned) == 1 and "using the default config" in warned[0]


def test_no_table_means_the_default_and_other_capabilities_are_not_neighbours() -> None:
    config, source, warned = select(spec("prefill_causal", ps=16), "q1-256")
    assert source == "default" and config == default_prefill_config(spec("prefill_causal", ps=16))
    assert len(warned) == 1
    dispatch.merge(H100, {(spec(ps=64).name(), "b1-16_kv1-2k"): entry(marked(128), spec(ps=64))})
    config, source, _ = select(spec(ps=16), "b1-16_kv1-2k")  # an H200 takes the H100's neighbours
    assert config.split_tokens == 128 and source.endswith(f"tuned on {H100.key} (same capability)")
    _, source, _ = select(spec(ps=16), "b1-16_kv1-2k", A100)
    assert source == "default"


def test_derivation_is_cached_per_bucket_and_warns_once_per_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch.merge(H200, {(spec(ps=64).name(), "b1-16_kv1-2k"): entry(marked(128), spec(ps=64))})
    calls = []
    real = dispatch.derive

    def counting(*args: object) -> object:
        calls.append(args[:2])
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "derive", counting)
    warned = []
    for _ in range(3):
        for bucket in ("b1-16_kv1-2k", "b17-96_kv1-2k", "b97+_kv1-2k"):
            warned += select(spec(ps=16), bucket)[2]
    assert len(calls) == 3 and len(warned) == 1
    first = select(spec(ps=16), "b1-16_kv1-2k")[0]
    dispatch.reload()
    assert select(spec(ps=16), "b1-16_kv1-2k")[0] == first  # deterministic


# -- the fixed default ---------------------------------------------------------------------------------------


def test_default_follows_what_the_catalogue_tune_chose() -> None:
    """The H200 catalogue tune's rules (perf/LOG.md v17): prefill gathers 64-token tiles, 2 stages, at every
    page size; few short decode requests take 128-token shares; few requests at 64+ heads a 4 x 128 merge tile."""
    from tuner.runtime.config import default_decode_config

    for ps in (1, 16, 32, 64):
        for heads in (8, 16, 64, 128):
            c = default_prefill_config(spec("prefill_causal", heads=heads, ps=ps))
            assert (c.block_n, c.num_stages, c.tma) == (64, 2, int(ps >= 64)), (heads, ps, c)
    assert ws_tiles(spec(heads=128, ps=16)) == (16, 4)  # decode at 64+ heads keeps one page per tile
    small, long_, many = (8, 1500.0), (8, 6000.0), (64, 1500.0)
    for heads in (16, 64, 128):
        s = spec(heads=heads)
        assert default_decode_config(s, *small, 132).split_tokens == 128
        assert default_decode_config(s, *long_, 132).split_tokens == 64
        assert default_decode_config(s, *many, 132).split_tokens == 64
        merge = default_decode_config(s, *small, 132)
        assert (merge.merge_block_h, merge.merge_block_d) == (4, 128)
    wide = default_decode_config(spec(heads=128), *many, 132)
    assert (wide.merge_block_h, wide.merge_block_d) == (8, 512)
