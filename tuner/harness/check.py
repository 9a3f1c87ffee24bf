"""The one correctness rule, used by the tuner's gate, the benchmark and the tests.

FlashInfer-Bench's rule: an output element fails only if it misses both the absolute and the relative
tolerance (``|out - ref| > atol`` and ``|out - ref| > rtol * |ref|``); nothing may be NaN or infinite.
The log-sum-exp (base 2, float32) is held to its own absolute tolerance, and must be -inf exactly where
the reference's is (a row that sees no token), where the output must be exactly 0. The reference is the
float32 one of :mod:`tuner.harness.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """atol / rtol: the elementwise bounds of the output; lse: the absolute bound of the lse."""

    atol: float
    rtol: float
    lse: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, lse=1e-4),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, lse=1e-3),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1e-2, lse=1e-3),  # FlashInfer-Bench's default bar
}
"""The tolerance of each output dtype: the contract's 1e-2 for bf16, tighter where the dtype allows."""


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    if dtype not in TOLERANCES:
        raise TypeError(f"dtype: expected one of {', '.join(map(str, TOLERANCES))}, found {dtype}")
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`check`: ``passed``, ``reason`` (empty when passed) and, for reports, the
    largest absolute output error, the relative Frobenius error and the largest lse error (None where
    not computed)."""

    passed: bool
    reason: str = ""
    max_err: float | None = None
    rel_err: float | None = None
    lse_err: float | None = None

    def __bool__(self) -> bool:
        return self.passed


def check(out: torch.Tensor, lse: torch.Tensor | None, ref_out: torch.Tensor, ref_lse: torch.Tensor,
          tol: Tolerance | None = None) -> Verdict:
    """Hold ``out [R, H, ckv]`` and ``lse [R, H]`` (None: a kernel that returns no lse) to the float32
    reference ``ref_out`` / ``ref_lse`` under ``tol`` (default: by ``out.dtype``). Only the first
    ``ref_out.shape[0]`` rows of ``out`` and ``lse`` are compared (a reference of a prefix of the batch)."""
    tol = tol or tolerance_for(out.dtype)
    rows = ref_out.shape[0]
    if out.shape[0] < rows or tuple(out.shape[1:]) != tuple(ref_out.shape[1:]):
        return Verdict(False, f"output shape {tuple(out.shape)}, expected {tuple(ref_out.shape)}")
    o, ref = out[:rows].float(), ref_out.float()
    if not bool(torch.isfinite(o).all()):
        return Verdict(False, f"{int((~torch.isfinite(o)).sum())} non-finite values (NaN or inf) in the output")
    empty = torch.isneginf(ref_lse)
    if bool(empty.any()) and not bool((o[empty] == 0).all()):
        return Verdict(False, "output of rows that see no token is not exactly 0")
    err = (o - ref).abs()
    max_err = float(err.max()) if err.numel() else 0.0
    norm = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(o - ref))
    rel = diff / norm if norm > 0 else diff
    lse_err = None
    if lse is not None:
        if lse.shape[0] < rows or tuple(lse.shape[1:]) != tuple(ref_lse.shape[1:]):
            return Verdict(False, f"lse shape {tuple(lse.shape)}, expected {tuple(ref_lse.shape)}", max_err, rel)
        got = lse[:rows].float()
        if bool(got.isnan().any()):
            return Verdict(False, "NaN in the lse", max_err, rel)
        if not torch.equal(torch.isneginf(got), empty) or bool(torch.isposinf(got).any()):
            return Verdict(False, "lse is not -inf exactly where the reference is", max_err, rel)
        seen = ~empty
        lse_err = float((got[seen] - ref_lse[seen].float()).abs().max()) if bool(seen.any()) else 0.0
    bad = (err > tol.atol) & (err > tol.rtol * ref.abs())
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        return Verdict(False, f"{int(bad.sum())} of {bad.numel()} output elements miss atol={tol.atol:g} and "
                              f"rtol={tol.rtol:g} (first at {first}, max error {max_err:.3g})", max_err, rel, lse_err)
    if lse_err is not None and lse_err > tol.lse:
        return Verdict(False, f"lse error {lse_err:.3g} > {tol.lse:g}", max_err, rel, lse_err)
    return Verdict(True, "", max_err, rel, lse_err)
