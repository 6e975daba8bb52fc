"""Block-shape and launch-option sweep for the paired-softmax Triton kernels (input to
paired/tuning.py's TUNED and KernelOptions defaults).

    PYTHONPATH=. python benchmarks/scripts/kernels_sweep.py [--lengths 2048,8192] [--options tma=0/tma=1] [--out DIR]

For each L and (variant, d) of the kernel table at B*L = 16k tokens, bf16: times the forward kernel
and the whole backward (delta + dK/dV + dQ) under each candidate (BLOCK_M, BLOCK_N, warps, stages)
of one kernel at a time, the others at their defaults, and under each set of launch options
(KernelOptions). The launchers are called directly, as the ops' eager path calls them:
with torch's wrap_triton dispatch off (its higher-order-op path costs the host ~0.5 ms a launch,
which at L <= 2k outlasts the kernels, so the sweep would time the host; docs/kernels.md).
Each result is compared with the first option set's defaults (relative error), so a wrong tile
shows up. Prints one JSON line per candidate, then the fastest candidate per
(variant, d, L, kernel) against the tile that kernel uses now under the first option set.
"""
import argparse
import json
import os
import time

import torch
from triton.testing import do_bench

from benchmarks._common import gpu_clocks, kernel_options, warm_gpu
from backends.cuda.ops.paired import launch as ps
from backends.cuda.ops.paired import tuning
from backends.cuda.ops.paired.tuning import KernelOptions
from diffattn.numerics import rel_error as rel

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
            (64, 64, 4, 4), (128, 32, 8, 3), (64, 32, 4, 3)],
    # (32, 128, 4, 3), (16, 64, 4, 3) and the fewest-spill tiles (32, 64, 8, 2/3) ran 1.2x to 3x slower
    # at every L, V1 and V2
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
    "dq": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
           (64, 64, 8, 3)],
}
SHAPES = [("diff_v1", 64), ("diff_v2", 64), ("diff_v1", 128), ("diff_v2", 128)]


def parse_options(text) -> KernelOptions:
    """'tma=0+diagonal=last' -> KernelOptions; a bad option stops the script."""
    return kernel_options(text, "")


def main():
    try:  # what torch.library.triton_op does around an eager call: launch the kernels directly
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # an older torch: every launch pays the dispatch (printed, so it is seen)
        print("kernels_sweep: torch has no set_wrap_triton_enabled; launches go through wrap_triton's dispatch")
        return _main()
    with set_wrap_triton_enabled(False):
        return _main()


def _main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--options", default="tma=1", help="option sets separated by '/', e.g. tma=0/tma=1")
    ap.add_argument("--out", default=".")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--shapes", default=",".join(f"{v}:{d}" for v, d in SHAPES), help="variant:d,...")
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--default-tiles", action="store_true", help="only the tile each kernel uses now (an options A/B)")
    ap.add_argument("--tiles", nargs="*", default=[], help="kernel:BM,BN,warps,stages/... instead of CANDIDATES")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new candidates after this long")
    a = ap.parse_args()
    H, dt = a.heads, torch.bfloat16
    option_sets = [parse_options(o) for o in a.options.split("/")]
    given = {t.split(":")[0]: [tuple(int(x) for x in c.split(",")) for c in t.split(":")[1].split("/")] for t in a.tiles}
    warm_gpu()  # the first candidates of a fresh instance otherwise run at idle clocks (sweep 11)
    results, start = [], time.time()
    shapes = [(s.split(":")[0], int(s.split(":")[1])) for s in a.shapes.split(",")]
    for L, (variant, d) in ((int(L), shape) for L in a.lengths.split(",") for shape in shapes):
        B = max(1, 16384 // L)
        v1 = variant == "diff_v1"
        DV = 2 * d if v1 else d
        q = torch.randn(B, L, 2 * H, d, device="cuda", dtype=dt)
        k = torch.randn(B, L, 2 * H if v1 else H, d, device="cuda", dtype=dt)
        v = torch.randn(B, L, H, DV, device="cuda", dtype=dt)
        lam = torch.tensor(0.6, device="cuda").expand(B, L, H) if v1 else torch.rand(B, L, H, device="cuda", dtype=dt)
        do = torch.randn(B, L, H, DV, device="cuda", dtype=dt)
        ks, shared = (2, False) if v1 else (1, True)
        first = option_sets[0]
        out, o2, lse = ps.forward(q, k, v, lam, ks, shared, options=first)
        grads = ps.backward(do, q, k, v, lam, out, o2, lse, ks, shared, options=first)[:3]
        flop_fwd = B * H * (6 if v1 else 4) * L * L * d
        tiles = {kn: [tuning.blocks(kn, d, DV, dt, shared, first)] if a.default_tiles else given.get(kn, CANDIDATES[kn])
                 for kn in a.kernels.split(",")}
        jobs = [(kn, cfg, opts) for kn in a.kernels.split(",") for cfg in tiles[kn] for opts in option_sets]
        for kernel, cfg, opts in jobs:
            if time.time() - start > a.budget_s:
                break
            o = opts.with_tiles({(kernel, d, DV, 2): cfg})
            row = dict(variant=variant, d=d, L=L, kernel=kernel, cfg=cfg, options=opts.text())
            try:
                if kernel == "fwd":
                    y = ps.forward(q, k, v, lam, ks, shared, options=o)[0]
                    row["err"] = rel(y, out.float())
                    row["ms"] = do_bench(lambda: ps.forward(q, k, v, lam, ks, shared, options=o), return_mode="median")
                    row["tflops"] = flop_fwd / row["ms"] / 1e9
                else:
                    g = ps.backward(do, q, k, v, lam, out, o2, lse, ks, shared, options=o)[:3]
                    row["err"] = max(rel(a, b.float()) for a, b in zip(g, grads))
                    row["ms"] = do_bench(lambda: ps.backward(do, q, k, v, lam, out, o2, lse, ks, shared, options=o),
                                         return_mode="median")
                    row["tflops"] = 2.5 * flop_fwd / row["ms"] / 1e9
            except Exception as e:  # out of shared memory / registers for this tile
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}" if str(e) else type(e).__name__
            row.update(gpu_clocks())  # right after the timing: a slow row at a held clock reads as such
            print(json.dumps(row), flush=True)
            results.append(row)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_best(results, option_sets[0].text())


def print_best(results, first_options):
    """One line per (variant, d, L, kernel): the fastest candidate against the tile the kernel uses now
    (tuning.blocks) under the first option set, or against the first candidate if that was not run."""
    groups = {}
    for r in results:
        if "ms" in r and r["err"] < 2e-2:
            groups.setdefault((r["variant"], r["d"], r["L"], r["kernel"]), []).append(r)
    for (variant, d, L, kernel), rows in groups.items():
        now = tuning.blocks(kernel, d, 2 * d if variant == "diff_v1" else d, torch.bfloat16, variant == "diff_v2")
        base = next((r for r in rows if r["cfg"] == now and r["options"] == first_options), rows[0])
        best = min(rows, key=lambda r: r["ms"])
        print(variant, d, L, kernel, "now" if base["cfg"] == now else "first", base["cfg"], base["options"],
              f"{base['ms']:.3f} ms", "| best", best["cfg"], best["options"],
              f"{best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
