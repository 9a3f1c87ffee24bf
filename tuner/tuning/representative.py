"""The representative batches a bucket is tuned and re-timed on, built from the lengths each
:class:`~tuner.runtime.buckets.Bucket` carries: lognormal with fixed seeds, the page ids a random
permutation when made into inputs (:func:`tuner.harness.inputs.make_inputs`)."""

from __future__ import annotations

from tuner.harness.inputs import Workload, skewed_lengths
from tuner.runtime.buckets import Bucket, Lengths
from tuner.runtime.spec import MLASpec


def draw(lengths: Lengths) -> tuple[int, ...]:
    """``lengths.count`` values around its median, clipped to [lo, hi], from its fixed seed."""
    if lengths.lo == lengths.hi:
        return (lengths.lo,) * lengths.count
    return skewed_lengths(lengths.count, lengths.median, lengths.lo, lengths.hi, lengths.sigma, lengths.seed)


def workload(bucket: Bucket, spec: MLASpec) -> Workload:
    """The representative batch of this bucket for ``spec``'s heads and head dims."""
    bucket.check_kind(spec)
    lengths = draw(bucket.lengths)
    if bucket.kind == "decode":
        return Workload(f"{bucket.name}", spec.num_heads, lengths, head_dim_ckv=spec.head_dim_ckv,
                        head_dim_kpe=spec.head_dim_kpe)
    prefix = draw(bucket.prefix) if bucket.prefix is not None else (0,) * len(lengths)
    return Workload(bucket.name, spec.num_heads, tuple(q + p for q, p in zip(lengths, prefix, strict=True)), lengths,
                    causal=spec.causal, head_dim_ckv=spec.head_dim_ckv, head_dim_kpe=spec.head_dim_kpe)


def half_workload(bucket: Bucket, spec: MLASpec) -> Workload:
    """The first half of the representative's requests (at least one): the finalists are re-timed on
    it too, so that a config tuned to the representative's size (a split count, say) does not lose
    on the smaller batches of the same bucket."""
    full = workload(bucket, spec)
    n = max(1, full.batch // 2)
    q_lens = None if full.q_lens is None else full.q_lens[:n]
    return Workload(f"{bucket.name}-half", full.heads, full.kv_lens[:n], q_lens, causal=full.causal,
                    head_dim_ckv=full.head_dim_ckv, head_dim_kpe=full.head_dim_kpe)


def check_workloads(bucket: Bucket, spec: MLASpec) -> tuple[Workload, ...]:
    """The batches the finalists are re-timed on besides the representative: its first half and, where
    the bucket starts at one request and the half holds more, a single request of the typical length
    (``lengths.median``): a config must not lose at the bucket's small end either (H200: a b1-16 entry
    picked on 4 and 2 requests ran d-b1-1k in 20.8 µs against the default's 18.5)."""
    half = half_workload(bucket, spec)
    if bucket.rows[0] > 0 or half.batch <= 1:
        return (half,)
    full = workload(bucket, spec)
    if full.q_lens is None:
        one = Workload(f"{bucket.name}-one", full.heads, (bucket.lengths.typical,),
                       head_dim_ckv=full.head_dim_ckv, head_dim_kpe=full.head_dim_kpe)
    else:
        q = bucket.lengths.typical
        prefix = bucket.prefix.typical if bucket.prefix is not None else 0
        one = Workload(f"{bucket.name}-one", full.heads, (q + prefix,), (q,), causal=full.causal,
                       head_dim_ckv=full.head_dim_ckv, head_dim_kpe=full.head_dim_kpe)
    return half, one


def tiny_workload(bucket: Bucket, spec: MLASpec) -> Workload:
    """A few sequences of tens of tokens, for the Triton interpreter (the dry run): the same
    code path, none of the bucket's scale."""
    bucket.check_kind(spec)
    kv = (37, 5, 64)
    common = dict(head_dim_ckv=spec.head_dim_ckv, head_dim_kpe=spec.head_dim_kpe)
    if bucket.kind == "decode":
        return Workload(f"{bucket.name}-tiny", spec.num_heads, kv, **common)  # type: ignore[arg-type]
    return Workload(f"{bucket.name}-tiny", spec.num_heads, kv, (9, 1, 16), causal=spec.causal,
                    **common)  # type: ignore[arg-type]
