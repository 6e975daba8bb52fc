"""A/B of the warp-specialized Gluon forward (ops/paired_forward_ws.py) against the Triton forward
(paired_softmax.forward), alternated in one process: correctness (relative error of out, o2, lse
against the Triton forward, bf16) at odd and table lengths, then time at B*L = 16k, 16 heads.

    PYTHONPATH=. python benchmarks/scripts/gluon_forward_ab.py [--lengths 2048,8192,16384]
"""
import argparse

import torch
from triton.testing import do_bench

from benchmarks._common import warm_gpu
from diffattn.backends.cuda.ops import paired_forward_ws as pg
from diffattn.backends.cuda.ops import paired_softmax as ps


def inputs(variant, d, B, L, H, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    v1 = variant == "diff_v1"
    DV = 2 * d if v1 else d
    q = torch.randn(B, L, 2 * H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, L, 2 * H if v1 else H, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, L, H, DV, device="cuda", dtype=torch.bfloat16, generator=g)
    lam = (torch.tensor(0.6, device="cuda").expand(B, L, H) if v1 else
           torch.rand(B, L, H, device="cuda", generator=g).to(torch.bfloat16))
    return q, k, v, lam, (2, False) if v1 else (1, True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--shapes", default="diff_v2:64,diff_v1:64")
    ap.add_argument("--stages", default="2,3")
    a = ap.parse_args()
    warm_gpu()
    shapes = [(s.split(":")[0], int(s.split(":")[1])) for s in a.shapes.split(",")]
    print("| variant | d | L | code | ms | TFLOP/s | err out | err o2 | err lse |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, d in shapes:
        for L in (300, 1000, 64, 100):  # correctness only: rows and keys past L, several batches and heads
            q, k, v, lam, (ks, shared) = inputs(variant, d, 3, L, 4)
            ps._use_tma(k, v)  # sets Triton's allocator for in-kernel descriptors
            want = ps.forward(q, k, v, lam, ks, shared)
            for st in map(int, a.stages.split(",")):
                got = pg.forward(q, k, v, lam, ks, shared, stages=st)
                print(f"| {variant} | {d} | {L} | gluon s{st} | - | - | " + " | ".join(
                    f"{rel(x, y):.1e}" for x, y in zip(got, want)) + " |", flush=True)
        for L in map(int, a.lengths.split(",")):
            B, H = max(1, 16384 // L), 16
            q, k, v, lam, (ks, shared) = inputs(variant, d, B, L, H)
            ps._use_tma(k, v)
            flops = B * H * (6 if variant == "diff_v1" else 4) * L * L * d
            want = ps.forward(q, k, v, lam, ks, shared)
            codes = [("triton", lambda: ps.forward(q, k, v, lam, ks, shared))]
            codes += [(f"gluon s{st}", lambda st=st: pg.forward(q, k, v, lam, ks, shared, stages=st))
                      for st in map(int, a.stages.split(","))]
            for rnd in range(2):
                for name, fn in codes:
                    errs = " | ".join(f"{rel(x, y):.1e}" for x, y in zip(fn(), want))
                    ms = do_bench(fn, return_mode="median")
                    print(f"| {variant} | {d} | {L} | {name} (round {rnd + 1}) | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                          f"{errs} |", flush=True)


if __name__ == "__main__":
    main()
