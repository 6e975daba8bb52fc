"""The fused DIFF V1 attention as MLX custom kernels (Metal or CUDA): forward and backward.

Forward: kernel.py's fwd body (both maps, the lambda combine, each map's log-sum-exp).
Backward: its dq body (dQ and delta_m = dO . (P_m V)) then its dkdv body (dK, dV), from the
saved log-sum-exp; dlam = -sum(delta_2). The bodies run on CPU threads in the tests
(emulate.py); on a GPU they are checked against the composed path (tests/test_mlx_kernels.py).
"""
import functools

import mlx.core as mx

from backends.mlx.ops.diff_v1 import kernel


def gpu_dialect() -> str | None:
    """'metal' on Apple GPUs, 'cuda' on MLX's CUDA build, None without a GPU."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def _build(name: str, dialect: str):
    header, source = kernel.source(name, dialect)
    args = dict(name=f"diffattn_diff_v1_{name}", input_names=kernel.INPUTS[name], output_names=kernel.OUTPUTS[name],
                source=source, header=header, ensure_row_contiguous=False)
    if dialect == "metal":
        return mx.fast.metal_kernel(**args)
    return mx.fast.cuda_kernel(**args)


def _launch(name, dialect, inputs, blocks, heads, batch, output_shapes, output_dtypes):
    q = inputs[0]
    nw, bk = kernel.tile_config(name, q.shape[-1], dialect, q.dtype.size)
    return _build(name, dialect)(
        inputs=inputs, template=[("T", q.dtype), ("D", q.shape[-1]), ("NW", nw), ("BK", bk)],
        grid=(-(-blocks // (16 * nw)) * nw * 32, heads, batch), threadgroup=(nw * 32, 1, 1),
        output_shapes=output_shapes, output_dtypes=output_dtypes)


def _dialect(dialect):
    dialect = dialect or gpu_dialect()
    if dialect is None:
        raise RuntimeError("the fused DIFF V1 kernels need a GPU (Metal or MLX's CUDA build)")
    return dialect


def diff_v1_fused_forward(q, k, v, lam, dialect: str | None = None):
    """(out (B, L, H, 2d) in q's dtype, lse (B, L, H, 2) float32). Strided views are read in place."""
    dialect = _dialect(dialect)
    B, L, H2, D = q.shape
    if k.shape[-1] != D or v.shape[-1] != 2 * D or (H2 // 2) % (k.shape[2] // 2):
        raise ValueError(f"diff_v1 fused: shapes q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    lam = mx.reshape(lam, (1,)).astype(mx.float32)
    return _launch("fwd", dialect, [q, k, v, lam], L, H2 // 2, B, [(B, L, H2 // 2, 2 * D), (B, L, H2 // 2, 2)],
                   [q.dtype, mx.float32])


def diff_v1_fused_backward(q, k, v, lam, dout, lse, dialect: str | None = None):
    """(dq, dk, dv, dlam) from the forward's lse."""
    dialect = _dialect(dialect)
    B, L, H2, D = q.shape
    lam1 = mx.reshape(lam, (1,)).astype(mx.float32)
    dout = dout.astype(q.dtype)
    dq, delta = _launch("dq", dialect, [q, k, v, lam1, dout, lse], L, H2 // 2, B, [q.shape, (B, L, H2 // 2, 2)],
                        [q.dtype, mx.float32])
    dk, dv = _launch("dkdv", dialect, [q, k, v, lam1, dout, lse, delta], L, k.shape[2] // 2, B, [k.shape, v.shape],
                     [k.dtype, v.dtype])
    dlam = -mx.sum(delta[..., 1])
    return dq, dk, dv, mx.reshape(dlam, lam.shape).astype(lam.dtype)


@mx.custom_function
def _diff_v1_fused(q, k, v, lam):
    return diff_v1_fused_forward(q, k, v, lam)


@_diff_v1_fused.vjp
def _diff_v1_fused_vjp(primals, cotangents, outputs):
    # lse is this op's saved statistic, not differentiated: its cotangent is ignored
    return diff_v1_fused_backward(*primals, cotangents[0], outputs[1])


def diff_v1_fused(q, k, v, lam):
    return _diff_v1_fused(q, k, v, lam)[0]
