"""Attention ops of the MLX backend, one module (or folder) per op, each with its naive reference.

All causal, scale 1/sqrt(head_dim), inputs already RoPE'd, layout (B, L, heads, dim) as the
projections give it (strided views welcome):
    vanilla(q (B,L,H,d), k/v (B,L,G,d))                    -> (B,L,H,d)
    diff_v1(q (B,L,2H,d), k (B,L,2G,d), v (B,L,G,2d), lam) -> (B,L,H,2d) = A1 v - lam A2 v
    diff_v2(q (B,L,2H,d), k/v (B,L,G,d), lam (B,L,H))      -> (B,L,H,d)
`impl` is "composed" (MLX's fused SDPA), "naive" (materialised softmax) or "fused" (our
kernel; DIFF V1 only: the other variants are a single SDPA call already).
"""
from backends.mlx.ops.diff_v1.composed import diff_v1_composed, diff_v1_naive
from backends.mlx.ops.diff_v1.fused import diff_v1_fused, diff_v1_fused_forward, gpu_dialect
from backends.mlx.ops.diff_v2 import diff_v2_composed, diff_v2_naive
from backends.mlx.ops.vanilla import vanilla_composed, vanilla_naive

IMPLS = {
    "vanilla": {"composed": vanilla_composed, "naive": vanilla_naive, "fused": vanilla_composed},
    "diff": {"composed": diff_v1_composed, "naive": diff_v1_naive, "fused": diff_v1_fused},
    "diff_v2": {"composed": diff_v2_composed, "naive": diff_v2_naive, "fused": diff_v2_composed},
}

__all__ = ["IMPLS", "diff_v1_composed", "diff_v1_naive", "diff_v1_fused", "diff_v1_fused_forward",
           "diff_v2_composed", "diff_v2_naive", "vanilla_composed", "vanilla_naive", "gpu_dialect"]
