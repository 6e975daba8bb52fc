"""Where a synchronized single call of a fused DIFF op spends its time, beyond the kernels.

    PYTHONPATH=. python benchmarks/scripts/dispatch_overhead.py        (needs a CUDA GPU)

asv's `Attention.time_*` times one call followed by a device sync; the kernel table times
back-to-back launches with triton.testing.do_bench, which hides the host's work behind the GPU's.
For each variant at asv's large shape (B2-L4096-d2048, head_dim 64), forward only, bf16:
- kernels: do_bench of the Triton launcher alone (paired/launch.py's forward), GPU time;
- op: do_bench of the public op (backends.cuda.ops, impl="fused": checks, custom-op
  dispatch, launcher), GPU time of everything it launches;
- host: wall time of the op's Python call alone (no sync; the launch queue is drained first), i.e.
  what the CPU spends before the GPU has the work;
- synced: median wall time of call + torch.cuda.synchronize() (_common.median_seconds, which the
  asv suite's track_* use), what asv's time_forward reads.
"""
import statistics
import time

import torch
from triton.testing import do_bench

from benchmarks import _common as C
from backends.cuda import ops
from backends.cuda.ops.paired import launch as ps

B, L, D_MODEL, VANILLA_HEADS, HD = 2, 4096, 2048, 32, 64


def inputs(variant):
    H = VANILLA_HEADS // 2 if variant == "diff_v1" else VANILLA_HEADS  # output heads (config.twin)
    KH, DV = (2 * H, 2 * HD) if variant == "diff_v1" else (H, HD)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, L, 2 * H, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, L, KH, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, L, KH // 2 if variant == "diff_v1" else H, DV, device="cuda", dtype=torch.bfloat16, generator=g)
    lam = (torch.tensor(0.6, device="cuda") if variant == "diff_v1"
           else torch.rand(B, L, H, device="cuda", dtype=torch.bfloat16, generator=g))
    return q, k, v, lam


def host_ms(fn, reps=50):
    """Median wall time of fn() alone, the launch queue drained before each call."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def main():
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; B{B}-L{L}-d{D_MODEL}, bf16, forward\n")
    print("| variant | kernels ms (do_bench) | op ms (do_bench) | host ms (call, no sync) | synced ms (call + sync) |")
    print("|---|---|---|---|---|")
    for variant in ("diff_v1", "diff_v2"):
        q, k, v, lam = inputs(variant)
        op = getattr(ops, variant + "_attention")
        lam_rows = lam.expand(B, L, q.shape[2] // 2) if variant == "diff_v1" else lam
        ks, shared = (2, False) if variant == "diff_v1" else (1, True)
        with torch.no_grad():
            kernels = do_bench(lambda: ps.forward(q, k, v, lam_rows, ks, shared), return_mode="median")
            whole = do_bench(lambda: op(q, k, v, lam, impl="fused"), return_mode="median")
            host = host_ms(lambda: op(q, k, v, lam, impl="fused"))
            synced = C.median_seconds(lambda: op(q, k, v, lam, impl="fused"), lambda _: torch.cuda.synchronize()) * 1e3
        print(f"| {variant} | {kernels:.3f} | {whole:.3f} | {host:.3f} | {synced:.3f} |", flush=True)


if __name__ == "__main__":
    main()
