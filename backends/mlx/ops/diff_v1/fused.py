"""The fused DIFF V1 forward as an MLX custom kernel (Metal or CUDA), its backward by recompute.

Forward: one kernel (kernel.py) computes both softmax maps in one pass over the keys and the
lambda combine, and saves each map's log-sum-exp. Backward: `mx.custom_function`'s VJP
recomputes the composed path (two SDPA calls) and differentiates it with MLX's own SDPA VJP.
Why: it is exact and already fast where MLX's SDPA has a fused backward; a hand-written
backward kernel in two dialects is left for later (docs/mlx.md).
"""
import functools

import mlx.core as mx

from backends.mlx.ops.diff_v1 import kernel
from backends.mlx.ops.diff_v1.composed import diff_v1_composed


def gpu_dialect() -> str | None:
    """'metal' on Apple GPUs, 'cuda' on MLX's CUDA build, None without a GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def _build(dialect: str):
    header, source = kernel.source(dialect)
    args = dict(name="diffattn_diff_v1_fwd", input_names=["q", "k", "v", "lam"], output_names=["out", "lse"],
                source=source, header=header, ensure_row_contiguous=False)
    if dialect == "metal":
        return mx.fast.metal_kernel(**args)
    return mx.fast.cuda_kernel(**args)


def diff_v1_fused_forward(q, k, v, lam, dialect: str | None = None):
    """(out (B, L, H, 2d) in q's dtype, lse (B, L, H, 2) float32). Strided views are read in place."""
    dialect = dialect or gpu_dialect()
    if dialect is None:
        raise RuntimeError("the fused DIFF V1 kernel needs a GPU (Metal or MLX's CUDA build)")
    B, L, H2, D = q.shape
    H = H2 // 2
    if k.shape[-1] != D or v.shape[-1] != 2 * D or (H2 // 2) % (k.shape[2] // 2):
        raise ValueError(f"diff_v1 fused: shapes q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    bq, nw = kernel.tile_config(D, dialect)
    lam = mx.reshape(lam, (1,)).astype(mx.float32)
    out, lse = _build(dialect)(
        inputs=[q, k, v, lam],
        template=[("T", q.dtype), ("D", D), ("BQ", bq), ("NW", nw)],
        grid=(((L + bq - 1) // bq) * nw * 32, H, B),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(B, L, H, 2 * D), (B, L, H, 2)],
        output_dtypes=[q.dtype, mx.float32],
    )
    return out, lse


@mx.custom_function
def diff_v1_fused(q, k, v, lam):
    return diff_v1_fused_forward(q, k, v, lam)[0]


@diff_v1_fused.vjp
def _diff_v1_fused_vjp(primals, cotangent, output):
    _, grads = mx.vjp(diff_v1_composed, list(primals), [cotangent])
    return tuple(grads)
