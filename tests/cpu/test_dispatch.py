"""The dispatch table (tuner.runtime.dispatch): export and merge, lookup and its fallbacks, stale entries,
broken tables, and what the runtime calls."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

import tuner
from tuner.runtime import dispatch, paths
from tuner.runtime.config import DecodeConfig, PrefillConfig, default_decode_config, default_prefill_config
from tuner.runtime.device import GPUInfo, gpu_info
from tuner.runtime.loader import module_hash, module_path
from tuner.runtime.spec import MLASpec

DECODE = MLASpec("decode", 16, 512, 64, 1)
DECODE64 = MLASpec("decode", 16, 512, 64, 64)
PREFILL = MLASpec("prefill_causal", 16, 512, 64, 1)
H100 = GPUInfo(key="nvidia-h100-80gb-hbm3", name="NVIDIA H100 80GB HBM3", capability="9.0", num_sms=132)
H100_PCIE = GPUInfo(key="nvidia-h100-pcie", name="NVIDIA H100 PCIe", capability="9.0", num_sms=114)
H200 = GPUInfo(key="nvidia-h200", name="NVIDIA H200", capability="9.0", num_sms=132)
A100 = GPUInfo(key="nvidia-a100-sxm4-80gb", name="NVIDIA A100-SXM4-80GB", capability="8.0", num_sms=108)
TUNED = DecodeConfig(block_h=16, block_n=32, programs_per_sm=2, split_tokens=512, num_warps=4, num_stages=2,
                     merge_block_h=4, merge_block_d=64, merge_num_warps=2)
TUNED_PREFILL = PrefillConfig(block_m=2, block_h=16, block_n=32, num_warps=4, num_stages=2)


@pytest.fixture(autouse=True)
def generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A generated/ folder of its own (with the modules these tests hash) and a fresh dispatch cache."""
    root = tmp_path / "generated"
    (root / "dispatch").mkdir(parents=True)
    for spec in (DECODE, DECODE64, PREFILL):
        shutil.copy(module_path(spec), root / f"{spec.name()}.py")
    monkeypatch.setenv(paths.ENV_GENERATED_DIR, str(root))
    dispatch.reload()
    yield root
    dispatch.reload()


def entry(config: dispatch.Config, spec: MLASpec = DECODE, time_us: float = 10.0, **kw: object) -> dispatch.Entry:
    fields = dict(config=config, time_us=time_us, default_time_us=12.5, kernel_hash=module_hash(spec), trials=24,
                  versions={"torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8"})
    fields.update(kw)
    return dispatch.Entry(**fields)  # type: ignore[arg-type]


def lookup(spec: MLASpec, rows: int, avg_kv: float, gpu: GPUInfo) -> tuple[dispatch.Config, str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, _, source = dispatch.select(spec, rows, avg_kv, gpu)
    return config, source, [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]


# -- export and merge ----------------------------------------------------------------------------------


def test_merge_writes_a_sorted_validated_table(generated: Path) -> None:
    path = dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    assert path == generated / "dispatch" / f"{H100.key}.json"
    text = path.read_text()
    data = json.loads(text)
    assert data["schema_version"] == dispatch.SCHEMA_VERSION
    assert data["gpu"] == {"key": H100.key, "name": H100.name, "capability": "9.0", "num_sms": 132}
    e = data["kernels"][DECODE.name()]["b1-16_kv1-2k"]
    assert e["config"] == TUNED.to_dict() and e["time_us"] == 10.0 and e["default_time_us"] == 12.5
    assert e["kernel_hash"] == module_hash(DECODE) and set(e["versions"]) == {"torch", "triton", "cuda"}
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"  # sorted keys, stable bytes
    assert dispatch.load_table(path).entry(DECODE.name(), "b1-16_kv1-2k") == entry(TUNED)
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary file, renamed


def test_merge_keeps_other_kernels_buckets_and_gpus(generated: Path) -> None:
    dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    dispatch.merge(H100, {(DECODE64.name(), "b1-16_kv1-2k"): entry(TUNED, DECODE64),
                          (DECODE.name(), "b97+_kv2k+"): entry(TUNED, time_us=99.0)})
    dispatch.merge(H200, {(PREFILL.name(), "q1-256"): entry(TUNED_PREFILL, PREFILL)})
    dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED, time_us=8.0)})  # re-tuned: replaced
    h100 = dispatch.load_table(generated / "dispatch" / f"{H100.key}.json")
    assert sorted(h100.kernels) == [DECODE.name(), DECODE64.name()]  # ps=64 did not drop ps=1
    assert sorted(h100.kernels[DECODE.name()]) == ["b1-16_kv1-2k", "b97+_kv2k+"]
    assert h100.entry(DECODE.name(), "b1-16_kv1-2k").time_us == 8.0
    h200 = dispatch.load_table(generated / "dispatch" / f"{H200.key}.json")  # its own file
    assert list(h200.kernels) == [PREFILL.name()]


def test_merge_refuses_to_overwrite_a_broken_table(generated: Path) -> None:
    path = generated / "dispatch" / f"{H100.key}.json"
    path.write_text("{ not json")
    with pytest.raises(dispatch.DispatchTableError, match=str(path)):
        dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    assert path.read_text() == "{ not json"


def test_merge_refuses_unknown_buckets_and_kernel_names() -> None:
    with pytest.raises(ValueError, match="bucket"):
        dispatch.merge(H100, {(DECODE.name(), "b1-1000"): entry(TUNED)})
    with pytest.raises(ValueError, match="name"):
        dispatch.merge(H100, {("mla_paged_decode_h16", "b1-16_kv1-2k"): entry(TUNED)})


# -- lookup --------------------------------------------------------------------------------------------


def test_exact_gpu_entry_is_used_for_its_bucket_only() -> None:
    dispatch.merge(H100, {(DECODE.name(), "b17-96_kv2k+"): entry(TUNED)})
    config, source, warned = lookup(DECODE, 32, 4096, H100)
    assert config == TUNED and source == f"tuned on {H100.key}" and not warned
    config, source, warned = lookup(DECODE, 32, 1000, H100)  # another bucket: derived from it, with a warning
    assert config == TUNED and source == f"derived from {DECODE.name()} (bucket b17-96_kv2k+)"
    assert len(warned) == 1 and "no tuned dispatch entry" in warned[0] and source in warned[0]
    config, source, _ = lookup(PREFILL, 100, 1000, H100)  # no prefill entry anywhere: the default
    assert config == default_prefill_config(PREFILL) and source == "default"


def test_same_capability_fallback_prefers_the_same_sm_count() -> None:
    other = DecodeConfig(**{**TUNED.to_dict(), "block_n": 16})
    dispatch.merge(H100_PCIE, {(DECODE.name(), "b1-16_kv1-2k"): entry(other)})
    dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    config, source, warned = lookup(DECODE, 4, 1000, H200)  # H200: 9.0 like both, 132 SMs like the SXM
    assert config == TUNED and "same capability" in source
    assert len(warned) == 1 and H100.key in warned[0] and "same compute capability" in warned[0]
    config, source, _ = lookup(DECODE, 4, 1000, A100)  # another capability: the default
    assert source == "default" and config == default_decode_config(DECODE, 4, 1000, A100.num_sms, hopper=False)


def test_stale_entry_is_ignored_with_a_warning() -> None:
    dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED, kernel_hash="0123456789abcdef")})
    dispatch.merge(H200, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED_SAME := DecodeConfig(block_n=32))})
    config, source, warned = lookup(DECODE, 4, 1000, H100)
    assert config == TUNED_SAME and "same capability" in source  # the stale exact entry is skipped
    assert any("0123456789abcdef" in w and "re-run `mla-tune tune`" in w for w in warned)


def test_each_fallback_warns_once_per_kernel_and_reason() -> None:
    seen = []
    for batch in (1, 4, 200, 300):
        seen += lookup(DECODE, batch, 1000, H100)[2]
    seen += lookup(PREFILL, 100, 1000, H100)[2]
    assert len(seen) == 2 and DECODE.name() in seen[0] and PREFILL.name() in seen[1]


def test_interpreter_falls_back_silently() -> None:
    cpu = gpu_info(torch.device("cpu"))
    config, source, warned = lookup(PREFILL, 100, 1000, cpu)
    assert config == default_prefill_config(PREFILL, hopper=False) and source == "default" and not warned


BROKEN = {
    "bad JSON": lambda d: "{",
    "unknown top-level key": lambda d: {**d, "extra": 1},
    "missing key": lambda d: {k: v for k, v in d.items() if k != "gpu"},
    "schema version": lambda d: {**d, "schema_version": 99},
    "invalid config value": lambda d: _edit_entry(d, config={**TUNED.to_dict(), "block_n": 48}),
    "unknown entry key": lambda d: _edit_entry(d, note="x"),
    "negative time": lambda d: _edit_entry(d, time_us=-1),
    "unknown bucket": lambda d: {**d, "kernels": {DECODE.name(): {"b1-7": _entry_of(d)}}},
    "bad kernel name": lambda d: {**d, "kernels": {"mla_decode": {}}},
    "key is not the file name": lambda d: {**d, "gpu": {**d["gpu"], "key": "nvidia-other"}},
}


def _entry_of(data: dict) -> dict:
    return data["kernels"][DECODE.name()]["b1-16_kv1-2k"]


def _edit_entry(data: dict, **changes: object) -> dict:
    data = json.loads(json.dumps(data))
    data["kernels"][DECODE.name()]["b1-16_kv1-2k"].update(changes)
    return data


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_table_is_a_clear_error_and_a_runtime_fallback(generated: Path, breakage: str) -> None:
    path = dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    broken = BROKEN[breakage](json.loads(path.read_text()))
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    dispatch.reload()
    with pytest.raises(dispatch.DispatchTableError) as err:
        dispatch.load_table(path)
    assert str(path) in str(err.value)
    config, source, warned = lookup(DECODE, 4, 1000, H100)  # never a crash in the launch path
    assert source == "default" and config == default_decode_config(DECODE, 4, 1000, H100.num_sms)
    assert any(str(path) in w and "ignoring dispatch table" in w for w in warned)


def test_table_is_read_once_until_reload(generated: Path) -> None:
    path = dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    assert lookup(DECODE, 4, 1000, H100)[0] == TUNED
    path.write_text("{")  # changed behind the cache's back: not seen
    assert lookup(DECODE, 4, 1000, H100)[0] == TUNED
    dispatch.reload()
    assert lookup(DECODE, 4, 1000, H100)[1] == "default"


def test_lookup_is_cheap() -> None:
    dispatch.merge(H100, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED)})
    dispatch.select(DECODE, 4, 1000, H100)
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        dispatch.select(DECODE, 1 + i % 16, 1000.0, H100)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    assert per_call_us < 200, f"{per_call_us:.1f} us per lookup"


def test_runtime_plan_and_functional_form_use_the_table() -> None:
    """On the interpreter (GPU key cpu-interpreter) the runtime consults the table like on a GPU."""
    cpu = gpu_info(torch.device("cpu"))
    dispatch.merge(cpu, {(DECODE64.name(), "b1-16_kv1-2k"): entry(TUNED, DECODE64),
                         (PREFILL.name(), "q1-256"): entry(TUNED_PREFILL, PREFILL)})
    device = torch.device("cpu")
    assert dispatch.decode_config(DECODE64, 4, 1000, device) == TUNED
    assert dispatch.prefill_config(PREFILL, 100, 1000, device) == TUNED_PREFILL
    indptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    plan = tuner.MLADecode().plan(indptr, torch.arange(3, dtype=torch.int32), num_heads=16, page_size=64,
                                  sm_scale=0.1, num_pages=3)
    assert plan.config == TUNED


def test_entries_of_another_version_are_skipped_and_dropped_on_merge(generated: Path) -> None:
    """An entry whose config has another version's keys (a launch parameter added since, like ``ws``)
    is stale by construction: reading skips it with one warning and keeps the rest of the table, and
    the next merge writes the table without it (this session's `mla-tune tune` crashed on one)."""
    path = dispatch.merge(H200, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED),
                                 (PREFILL.name(), "q1-256"): entry(TUNED_PREFILL, PREFILL)})
    data = json.loads(path.read_text())
    del data["kernels"][PREFILL.name()]["q1-256"]["config"]["ws"]  # as written before `ws` existed
    path.write_text(json.dumps(data))
    dispatch.reload()
    table = dispatch.load_table(path)
    assert table.entry(DECODE.name(), "b1-16_kv1-2k") == entry(TUNED)
    assert table.entry(PREFILL.name(), "q1-256") is None
    assert "missing keys ['ws']" in table.outdated[f"{PREFILL.name()}.q1-256"]
    config, source, warned = lookup(DECODE, 4, 1000, H200)
    assert config == TUNED and source == "tuned on nvidia-h200"
    assert any("tuned by another mla-tuner version" in w for w in warned)
    dispatch.merge(H200, {(DECODE.name(), "b17-96_kv1-2k"): entry(TUNED)})
    kept = json.loads(path.read_text())["kernels"]
    assert PREFILL.name() not in kept and set(kept[DECODE.name()]) == {"b1-16_kv1-2k", "b17-96_kv1-2k"}
    bad = json.loads(path.read_text())
    bad["kernels"][DECODE.name()]["b1-16_kv1-2k"]["config"]["ws"] = 2
    with pytest.raises(dispatch.DispatchTableError, match="ws"):  # a wrong value is still an error
        dispatch.parse_table(json.dumps(bad))
    bad["kernels"][DECODE.name()]["b1-16_kv1-2k"]["config"]["block_k"] = 16  # an unknown key: another version's
    assert dispatch.parse_table(json.dumps(bad)).outdated


def test_entries_this_version_no_longer_takes_are_skipped(generated: Path) -> None:
    """A well-formed entry whose config this version's kernel refuses (here: ws=1 with 32-token tiles,
    which the 16-head warp-specialized stage 1 stopped taking) is another version's too: skipped with a
    warning, the rest of the table still read (it made the whole table unreadable on the GPU)."""
    path = dispatch.merge(H200, {(DECODE.name(), "b1-16_kv1-2k"): entry(TUNED),
                                 (DECODE.name(), "b17-96_kv1-2k"): entry(TUNED)})
    data = json.loads(path.read_text())
    data["kernels"][DECODE.name()]["b17-96_kv1-2k"]["config"].update(ws=1, block_h=16, block_n=32)
    path.write_text(json.dumps(data))
    dispatch.reload()
    table = dispatch.load_table(path)
    assert table.entry(DECODE.name(), "b1-16_kv1-2k") == entry(TUNED)
    assert table.entry(DECODE.name(), "b17-96_kv1-2k") is None
    assert "64-token tiles" in table.outdated[f"{DECODE.name()}.b17-96_kv1-2k"]
    data["kernels"][DECODE.name()]["b1-16_kv1-2k"]["config"]["block_h"] = 128  # more heads than the spec has
    assert set(dispatch.parse_table(json.dumps(data)).outdated) == {f"{DECODE.name()}.b1-16_kv1-2k",
                                                                   f"{DECODE.name()}.b17-96_kv1-2k"}
