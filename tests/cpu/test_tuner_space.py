"""The search spaces (tuner.tuning.space), their feasibility pruning, and the shape buckets (tuner.runtime.buckets)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from tuner.harness.inputs import benchmark_set
from tuner.runtime import buckets, resources
from tuner.runtime.config import (
    Config,
    DecodeConfig,
    PrefillConfig,
    default_decode_config,
    default_prefill_config,
    next_pow2,
    ws_block_h,
    ws_capable,
)
from tuner.runtime.spec import MLASpec, catalogue
from tuner.tuning import finalize, representative, space
from tuner.tuning import task as tasks
from tuner.tuning.space import space_for

H100_SMS = 132


def _default(spec: MLASpec, bucket: buckets.Bucket) -> Config:
    w = representative.workload(bucket, spec)
    if spec.is_decode:
        return default_decode_config(spec, w.batch, sum(w.kv_lens) / w.batch, H100_SMS)
    return default_prefill_config(spec)


@pytest.mark.parametrize("spec", catalogue(), ids=MLASpec.name)
def test_default_config_is_in_the_space_and_feasible(spec: MLASpec) -> None:
    for bucket in buckets.buckets_for(spec):
        default = _default(spec, bucket)
        sp = space.space_for(spec, default)
        assert sp.contains(default)
        assert sp.to_config(sp.values_of(default)) == default
        assert space.check(spec, default) is None, f"{spec.name()} {bucket.name}: default pruned"


def test_tiny_spec_space_holds_its_small_default() -> None:
    """A shape smaller than every choice (ckv 32) still gets its default's values as choices."""
    spec = MLASpec("decode", 8, 32, 16, 4)
    default = default_decode_config(spec, 3, 40, 4)
    sp = space.decode_space(spec, default)
    choices = {p.name: p.choices for p in sp.params}
    assert choices["merge_block_d"] == (32,)
    assert sp.contains(default)


def test_choices_respect_the_spec() -> None:
    for heads in (8, 16, 32, 64, 128):
        spec = MLASpec("decode", heads, 512, 64, 1)
        sp = space.decode_space(spec, default_decode_config(spec, 8, 4096, H100_SMS))
        block_h = dict((p.name, p.choices) for p in sp.params)["block_h"]
        assert max(block_h) <= max(16, next_pow2(heads))
        spec = MLASpec("prefill_causal", heads, 512, 64, 1)
        sp = space.prefill_space(spec, default_prefill_config(spec))
        assert max(dict((p.name, p.choices) for p in sp.params)["block_h"]) <= next_pow2(heads)


@pytest.mark.parametrize("spec", [MLASpec("decode", 16, 512, 64, 1), MLASpec("decode", 128, 512, 64, 64),
                                  MLASpec("prefill_causal", 16, 512, 64, 1), MLASpec("prefill", 64, 256, 32, 64)],
                         ids=MLASpec.name)
def test_every_feasible_point_is_a_valid_config(spec: MLASpec) -> None:
    default = default_decode_config(spec, 8, 4096, H100_SMS) if spec.is_decode else default_prefill_config(spec)
    sp = space.space_for(spec, default)
    grid = list(sp.grid())
    assert len(grid) == sp.size() and len({tuple(v.items()) for v in grid}) == len(grid)
    feasible = space.feasible_grid(sp)
    assert 0 < len(feasible) < len(grid)  # something is pruned, something is left
    for values in feasible:
        config = sp.to_config(values)
        config.check_spec(spec)
        assert sp.values_of(config) == values


# (config, shared bytes of Triton 3.6's sm_90 compile, ckv 512 + kpe 64, bf16): calibration points of
# resources.shared_bytes_estimate, which must never exceed what the compiler asks for.
MEASURED_SHARED = [
    (DecodeConfig(block_h=16, block_n=16, num_warps=8, num_stages=2), 37376),
    (DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=2), 94208),
    (DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=4), 241664),
    (DecodeConfig(block_h=16, block_n=128, num_warps=8, num_stages=1), 215040),
    (DecodeConfig(block_h=32, block_n=64, num_warps=8, num_stages=3), 188416),
    (DecodeConfig(block_h=64, block_n=16, num_warps=8, num_stages=1), 131072),
    (DecodeConfig(block_h=64, block_n=32, num_warps=8, num_stages=3), 184320),
    (DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=3), 294912),
    (PrefillConfig(block_m=2, block_h=16, block_n=64, num_warps=8, num_stages=2), 114688),
    (PrefillConfig(block_m=4, block_h=16, block_n=64, num_warps=8, num_stages=2), 221184),
    (PrefillConfig(block_m=8, block_h=16, block_n=16, num_warps=8, num_stages=1), 165888),
]


@pytest.mark.parametrize("config,measured", MEASURED_SHARED, ids=lambda x: getattr(x, "short", lambda: str(x))())
def test_shared_memory_estimate_is_a_close_lower_bound(config: Config, measured: int) -> None:
    variant = "decode" if isinstance(config, DecodeConfig) else "prefill_causal"
    spec = MLASpec(variant, 64, 512, 64, 1)  # type: ignore[arg-type]
    estimate = resources.shared_bytes_estimate(spec, config)
    assert 0.6 * measured <= estimate <= measured


@pytest.mark.parametrize("spec", [s for s in catalogue() if ws_capable(s)], ids=MLASpec.name)
def test_ws_shared_estimate_follows_the_generated_formula(spec: MLASpec) -> None:
    """The warp-specialized estimate is the generated module's ws_shared_bytes with one P buffer, less
    its vectors and barriers (at most 1 KB): the query rows are the heads below 64 heads, else 64."""
    from tuner.runtime.loader import load_module

    module = load_module(spec)
    for block_n, stages in ((64, 1), (64, 2), (32, 4), (16, 4)):
        config = (DecodeConfig(block_h=ws_block_h(spec), block_n=block_n, num_stages=stages, ws=1) if spec.is_decode
                  else PrefillConfig(block_m=64 // ws_block_h(spec), block_h=ws_block_h(spec), block_n=block_n,
                                     num_stages=stages, ws=1))
        gap = module.ws_shared_bytes(block_n, stages, 1) - resources.shared_bytes_estimate(spec, config)
        assert 0 <= gap <= 1024, (config.short(), gap)


@pytest.mark.parametrize("config,why", [
    (DecodeConfig(block_h=16, block_n=128, num_warps=8, num_stages=3), "shared memory"),
    (DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=4), "shared memory"),
    (DecodeConfig(block_h=64, block_n=32, num_warps=4, num_stages=2), "registers"),
    (DecodeConfig(block_h=16, merge_block_h=32, merge_block_d=256, merge_num_warps=2), "merge tile"),
    (DecodeConfig(block_h=256), "block_h"),
    (DecodeConfig(block_h=64, block_n=64, num_stages=2, ws=1, programs_per_sm=2), "one program per multiprocessor"),
    (PrefillConfig(block_m=8, block_h=16, block_n=16, num_warps=8, num_stages=1), "registers"),
    (PrefillConfig(block_m=4, block_h=16, block_n=64, num_warps=8, num_stages=3), "shared memory"),
    (PrefillConfig(block_m=1, block_h=128), "block_h"),
])
def test_infeasible_configs_are_pruned_with_a_reason(config: Config, why: str) -> None:
    variant = "decode" if isinstance(config, DecodeConfig) else "prefill_causal"
    spec = MLASpec(variant, 64, 512, 64, 1)  # type: ignore[arg-type]
    reason = space.check(spec, config)
    assert reason is not None and why in reason, reason


def test_smaller_gpus_prune_more() -> None:
    spec = MLASpec("decode", 16, 512, 64, 1)
    sp = space.decode_space(spec, default_decode_config(spec, 8, 4096, H100_SMS))
    h100 = len(space.feasible_grid(sp))
    small = len(space.feasible_grid(sp, space.Limits(shared_bytes=100 * 1024)))
    assert small < h100


def test_prefill_rows_must_split_into_heads() -> None:
    spec = MLASpec("prefill_causal", 64, 512, 64, 1)
    sp = space.prefill_space(spec, default_prefill_config(spec))
    config, reason = space.check_values(sp, {"rows": 16, "block_h": 32, "block_n": 32, "num_warps": 4,
                                             "num_stages": 2, "tma": 0, "ws": 0})
    assert config is None and reason is not None and "rows" in reason
    with pytest.raises(ValueError, match="missing parameters"):
        sp.to_config({"rows": 16})


def test_compact_form() -> None:
    assert space.compact(PrefillConfig(block_m=4, block_h=16, block_n=64, num_warps=8, num_stages=2)) == \
        "m4 h16 n64 w8 st2 t0 ws0"


# -- buckets -------------------------------------------------------------------------------------------


def test_buckets_tile_the_plane() -> None:
    """Every (rows, mean KV) falls in exactly one bucket of its kind, from empty batches to 512 x 128k."""
    rows = [0, 1, 2, 15, 16, 17, 95, 96, 97, 255, 256, 257, 512, 2047, 2048, 2049, 10**5]
    kvs = [0, 0.5, 1, 127, 128, 2047, 2048, 2048.5, 2049, 32768, 131072]
    for table in (buckets.DECODE_BUCKETS, buckets.PREFILL_BUCKETS):
        for r, kv in itertools.product(rows, kvs):
            inside = [b for b in table if b.contains(max(r, 1), max(kv, 1))]
            assert len(inside) == 1, (r, kv, [b.name for b in inside])
    assert buckets.decode_bucket(16, 2048).name == "b1-16_kv1-2k"
    assert buckets.decode_bucket(17, 2049).name == "b17-96_kv2k+"
    assert buckets.decode_bucket(0, 0).name == "b1-16_kv1-2k"
    assert buckets.prefill_bucket(4096, 100).name == "q2k+_kv1-2k"


def test_bucket_names_are_unique_and_parse_back() -> None:
    for kind in ("decode", "prefill"):
        names = buckets.bucket_names(kind)  # type: ignore[arg-type]
        assert len(set(names)) == len(names)
        for name in names:
            assert buckets.by_name(kind, name).name == name  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected one of"):
        buckets.by_name("decode", "q1-256")


def test_representative_workloads_sit_inside_their_bucket() -> None:
    for bucket in buckets.DECODE_BUCKETS + buckets.PREFILL_BUCKETS:
        variant = "decode" if bucket.kind == "decode" else "prefill_causal"
        spec = MLASpec(variant, 16, 512, 64, 64)  # type: ignore[arg-type]
        w = representative.workload(bucket, spec)
        assert w.spec(64) == spec
        rows = w.batch if bucket.kind == "decode" else w.total_q
        assert bucket.contains(rows, sum(w.kv_lens) / w.batch), bucket.name
        assert w.visible_pairs() > 0
        assert representative.workload(bucket, spec) == w  # fixed seeds
        tiny = representative.tiny_workload(bucket, spec)
        assert sum(tiny.kv_lens) < 200 and tiny.spec(64) == spec
    with pytest.raises(ValueError, match="is for decode"):
        representative.workload(buckets.DECODE_BUCKETS[0], MLASpec("prefill", 16, 512, 64, 1))


def test_benchmark_rows_land_in_distinct_plausible_buckets() -> None:
    """The edges put the benchmark set's rows (docs/benchmark_set.md) in buckets of their shape."""
    expected = {
        "d-b1-1k": "b1-16_kv1-2k", "d-b32-4k": "b17-96_kv2k+", "d-b128-2k": "b97+_kv1-2k",
        "d-b256-4k": "b97+_kv2k+", "d-b16-32k": "b1-16_kv2k+", "d-b64-skew": "b17-96_kv1-2k",
        "p-1x4k": "q2k+_kv2k+", "p-28-fresh": "q257-2k",
    }
    for w in benchmark_set():
        if w.name in expected:
            pick = buckets.decode_bucket if w.is_decode else buckets.prefill_bucket
            got = pick(w.batch if w.is_decode else w.total_q, sum(w.kv_lens) / w.batch).name
            assert got == expected[w.name], w.name


@pytest.mark.parametrize("shared", [101376, 166912, space.H100_SHARED_BYTES], ids=["99KB", "163KB", "227KB"])
@pytest.mark.parametrize("spec", catalogue(), ids=MLASpec.name)
def test_untuned_config_fits_the_gpu_shared_memory(spec: MLASpec, shared: int) -> None:
    """Without a tuned entry the runtime shrinks the default to the GPU (an A100 has 163 KB a block, an
    RTX 4090 99 KB); on a Hopper the default is left as it is."""
    from tuner.runtime.device import GPUInfo
    from tuner.runtime.dispatch import untuned_config

    gpu = GPUInfo("test-gpu", "test", "8.0", 108, shared_bytes=shared)
    for rows, avg_kv in ((1, 1000.0), (64, 8000.0), (4096, 2000.0)):
        config = untuned_config(spec, rows, avg_kv, gpu)
        config.check_spec(spec)
        assert resources.shared_bytes_estimate(spec, config) + resources.shared_margin(config) <= shared, config
        default = (default_decode_config(spec, rows, avg_kv, 108, hopper=False) if spec.is_decode
                   else default_prefill_config(spec, hopper=False))
        if shared == space.H100_SHARED_BYTES:
            assert config == default
        else:
            assert config.block_n <= default.block_n and config.num_stages <= default.num_stages


@pytest.mark.parametrize("spec", [MLASpec("decode", 16, 512, 64, 64), MLASpec("prefill_causal", 16, 512, 64, 64)],
                         ids=MLASpec.name)
def test_half_workload_is_the_first_half_of_the_representative(spec: MLASpec) -> None:
    """The finalists' second batch: the first half of the representative's requests, same spec."""
    for bucket in buckets.buckets_for(spec):
        full, half = representative.workload(bucket, spec), representative.half_workload(bucket, spec)
        assert half.batch == max(1, full.batch // 2)
        assert half.kv_lens == full.kv_lens[: half.batch] and half.spec(64) == full.spec(64)
        assert half.q_lens == (None if full.q_lens is None else full.q_lens[: half.batch])


def test_check_workloads_cover_the_small_end_of_each_bucket() -> None:
    """Besides the half batch, buckets that start at one request are re-timed on one request of the
    typical length (b1-16_kv1-2k: d-b1-1k's shape); the others only on the half."""
    spec = MLASpec("decode", 16, 512, 64, 64)
    for bucket in buckets.buckets_for(spec):
        checks = representative.check_workloads(bucket, spec)
        assert checks[0] == representative.half_workload(bucket, spec)
        if bucket.rows[0] == 0:
            (one,) = checks[1:]
            assert one.kv_lens == (bucket.lengths.median,) and one.spec(64) == spec
        else:
            assert len(checks) == 1
    prefill = MLASpec("prefill_causal", 16, 512, 64, 64)
    assert [len(representative.check_workloads(b, prefill)) for b in buckets.buckets_for(prefill)] == [1, 1, 1, 1]


class _FakeBench:
    """A Bench stand-in whose times come from a table: {config: µs} for one workload."""

    def __init__(self, name: str, times: dict, default) -> None:
        self.workload = SimpleNamespace(name=name)
        self.times, self.default = times, default

    def default_config(self):
        return self.default

    def floor_us(self, floors) -> float:
        return math.nan

    def check(self, config) -> None:
        return None

    def time(self, config, runs: int, warmup: int = 3):
        return SimpleNamespace(median_us=self.times[config])


def test_finalize_keeps_the_default_when_a_finalist_loses_on_a_check_batch() -> None:
    """A finalist replaces the default only when it is no slower on any batch (the representative, its
    half, one request): the best geometric mean among those, else the default."""
    optuna = pytest.importorskip("optuna")

    spec = MLASpec("decode", 16, 512, 64, 64)
    default = default_decode_config(spec, 4, 1024, 132)
    space = space_for(spec, default)
    fast, faster = replace(default, split_tokens=1024), replace(default, split_tokens=512)
    study = optuna.create_study()
    dists = {p.name: optuna.distributions.CategoricalDistribution(p.choices) for p in space.params}
    for number, (config, us) in enumerate(((default, 100.0), (fast, 85.0), (faster, 90.0))):
        study.add_trial(optuna.trial.create_trial(
            params={p.name: getattr(config, p.name) for p in space.params}, distributions=dists, value=us,
            user_attrs={"outcome": "ok", "effective": str(number), "default": config == default}))
    rep = _FakeBench("rep", {default: 100.0, fast: 85.0, faster: 90.0}, default)
    half = _FakeBench("half", {default: 55.0, fast: 54.0, faster: 40.0}, default)
    one = _FakeBench("one", {default: 18.5, fast: 18.0, faster: 19.0}, default)
    worse_one = _FakeBench("one", {default: 18.5, fast: 18.6, faster: 19.0}, default)
    task = tasks.Task(spec, buckets.by_name("decode", "b1-16_kv1-2k"))
    settings = tasks.Settings()
    assert finalize.finalize(task, study, space, rep, settings, None, [half]).best == faster
    # faster has the best geometric mean of the three batches but loses to the default on one request
    assert finalize.finalize(task, study, space, rep, settings, None, [half, one]).best == fast
    kept = finalize.finalize(task, study, space, rep, settings, None, [half, worse_one])
    assert kept.best == default and kept.best_us == 100.0 and kept.default_us == 100.0
