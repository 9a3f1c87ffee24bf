"""CPU study for issue 18's other way of doing the products: Q.K^T in fp8 tensor-core products with the
(bf16) queries split into T float8_e4m3fn terms, q ~ sum_i sigma_i * q8_i, each term with its own per-head
scale sigma_i = amax(residual) / 448, so that no cached K element needs converting for the scores.

Emulated in float64 on the CPU: every product of two e4m3 values is exact; the sums are either exact
("fp32 accumulate") or, to bracket Hopper's fp8 MMA (whose accumulation keeps fewer bits than float32: the
DeepSeek-V3 report measured about 14), each 32-wide k-chunk's partial sum rounded to 14 significant bits
before it is added ("14-bit chunks"). The output's weighted sum of V stays exact here, so the numbers are
what the split scores cost alone. Against: the float64 reference over the same (dequantized) fp8 cache with
the unsplit queries. Prints the largest |lse| error (base 2, the rule's 1e-3) and output error over random
normal data, 16 heads, KV lengths from 1 to 4096.

    python perf/fp8_qsplit_accuracy.py [--terms 1 2 3] [--seeds 4]
"""

from __future__ import annotations

import argparse
import math

import torch

FP8_MAX = 448.0


def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float64)


def split(q: torch.Tensor, terms: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """q [H, D] -> [(sigma [H, 1], q8 [H, D])] with sum(sigma * q8) ~ q."""
    out, r = [], q.clone()
    for _ in range(terms):
        sigma = (r.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-300)
        q8 = e4m3(r / sigma)
        out.append((sigma, q8))
        r = r - sigma * q8
    return out


def round_sig(x: torch.Tensor, bits: int) -> torch.Tensor:
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 2.0**bits) / 2.0**bits, e)


def dot(q8: torch.Tensor, k8: torch.Tensor, chunk_bits: int | None) -> torch.Tensor:
    """q8 [H, D] . k8 [N, D]^T, exact products; chunk sums rounded to chunk_bits significant bits."""
    if chunk_bits is None:
        return q8 @ k8.T
    total = torch.zeros(q8.shape[0], k8.shape[0], dtype=torch.float64)
    for c in range(0, q8.shape[1], 32):
        total += round_sig(q8[:, c:c + 32] @ k8[:, c:c + 32].T, chunk_bits)
    return total


def study(terms: int, kv_len: int, seed: int, chunk_bits: int | None, heads: int = 16) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    qn = torch.randn(heads, 512, generator=g).to(torch.bfloat16).double()
    qp = torch.randn(heads, 64, generator=g).to(torch.bfloat16).double()
    ckv, kpe = torch.randn(kv_len, 512, generator=g), torch.randn(kv_len, 64, generator=g)
    s_c, s_k = ckv.abs().max().item() / FP8_MAX, kpe.abs().max().item() / FP8_MAX
    c8, k8 = e4m3(ckv.double() / s_c), e4m3(kpe.double() / s_k)
    scale = 1.0 / math.sqrt(192) * math.log2(math.e)
    exact = (qn @ (c8 * s_c).T + qp @ (k8 * s_k).T) * scale
    approx = sum(sig * dot(q8, c8, chunk_bits) for sig, q8 in split(qn, terms)) * s_c
    approx = (approx + sum(sig * dot(q8, k8, chunk_bits) for sig, q8 in split(qp, terms)) * s_k) * scale
    v = c8 * s_c

    def attend(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = s.amax(dim=1, keepdim=True)
        p = torch.exp2(s - m)
        return (p @ v) / p.sum(1, keepdim=True), m.squeeze(1) + torch.log2(p.sum(1))

    (o1, l1), (o2, l2) = attend(exact), attend(approx)
    return (l1 - l2).abs().max().item(), (o1 - o2).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--terms", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--kv", type=int, nargs="+", default=[1, 7, 64, 1000, 4096])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    print("| q terms | accumulation | " + " | ".join(f"kv {n}: lse / out" for n in args.kv) + " |")
    print("|---|---|" + "---|" * len(args.kv))
    for terms in args.terms:
        for bits, label in ((None, "exact"), (14, "14-bit chunks")):
            cells = []
            for n in args.kv:
                errs = [study(terms, n, s, bits) for s in range(args.seeds)]
                cells.append(f"{max(e[0] for e in errs):.1e} / {max(e[1] for e in errs):.1e}")
            print(f"| {terms} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
