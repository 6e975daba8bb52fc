"""The fused DIFF V1 kernel of the MLX backend.

On a GPU (Metal on Apple Silicon, CUDA through MLX's CUDA build) the kernel is checked against
the composed path and a float64 numpy oracle: output, log-sum-exp and gradients, causal, GQA/MQA,
sequence lengths that are not multiples of the block size. Without a GPU those tests skip with
the reason; what runs everywhere: the body is dialect-neutral, the naive and composed paths
agree, and (where nvcc is installed) the CUDA build of the kernel compiles.
"""
import shutil
import subprocess

import numpy as np
import pytest

from attention_oracles import diff_v1_forward_oracle, diff_v1_oracle
from diffattn.numerics import rel_error

mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install 'diffattn[mlx]')")

from backends.mlx.ops import (diff_v1_composed, diff_v1_fused, diff_v1_fused_forward,  # noqa: E402
                                       diff_v1_naive, gpu_dialect)
from backends.mlx.ops.diff_v1 import emulate, kernel  # noqa: E402

DIALECT = gpu_dialect()
SHAPES = [  # B, L, H, G, d: L = 1, below, above and not a multiple of every block size
    (1, 1, 2, 1, 16), (2, 37, 4, 2, 64), (1, 100, 2, 1, 128), (1, 129, 4, 4, 32), (2, 19, 2, 2, 16)]


oracle = diff_v1_forward_oracle  # float64: (out, lse)


def inputs(B, L, H, G, d, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, L, 2 * H, d)), rng.standard_normal((B, L, 2 * G, d))
    v = rng.standard_normal((B, L, G, 2 * d))
    return [mx.array(t.astype(np.float32)).astype(dtype) for t in (q, k, v)] + [mx.array(0.37)]


rel = rel_error  # ||a - ref|| / ||ref||


# ---- everywhere ------------------------------------------------------------------------------

def test_kernel_bodies_are_dialect_neutral():
    for name, body in kernel.BODIES.items():
        for token in ("threadgroup", "simd", "metal::", "__syncthreads", "__shfl", "threadIdx", "blockIdx",
                      "__shared__", "wmma", "std::"):
            assert token not in body, (name, token)
        for dialect in ("metal", "cuda", "cpu"):
            header, src = kernel.source(name, dialect)
            assert src.endswith(body)
            for macro in ("SHARED", "BARRIER()", "WARP_SYNC()", "EXP2(", "LOG2(", "idx_t", "acc_mma", "acc_store"):
                assert macro in header, (dialect, macro)


@pytest.mark.parametrize("dialect,itemsize", [("metal", 4), ("cuda", 2), ("cuda", 4)])
@pytest.mark.parametrize("name", sorted(kernel.BODIES))
def test_tiles_fit_the_shared_memory_budget(dialect, itemsize, name):
    for d in (16, 32, 64) + ((128,) if dialect == "cuda" and itemsize == 2 else ()):  # float32 d128: composed
        nw, bk = kernel.tile_config(name, d, dialect, itemsize)
        tn = kernel.TILE[dialect]
        assert bk % tn == 0 and kernel.shared_bytes(name, d, nw, bk, tn, 4 if dialect == "metal" else itemsize) \
            <= kernel.BUDGET[dialect]
    with pytest.raises(ValueError, match="multiple of"):
        kernel.tile_config(name, kernel.TILE[dialect] + 4, dialect, itemsize)


def close(a, ref, tol):
    """rel_error, or the absolute norm where the reference is zero (L = 1: dq, dk vanish)."""
    n = np.linalg.norm(ref)
    return (rel(a, ref) if n > 0 else np.linalg.norm(np.asarray(a, np.float64))) <= tol


EMULATED = [(1, 1, 2, 1, 16), (2, 37, 4, 2, 32), (1, 50, 4, 1, 16), (1, 33, 2, 2, 48)]


@pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20) to build the CPU emulation")
@pytest.mark.parametrize("tn", [8, 16], ids=["metal-tile", "cuda-tile"])
@pytest.mark.parametrize("shape", EMULATED, ids=lambda s: "B{}L{}H{}G{}d{}".format(*s))
def test_emulated_kernels_match_float64(shape, tn):
    """The three bodies on CPU threads against float64: output, lse and every gradient to float32's
    1e-5 (they compute in float32; observed ~2e-7), causal, GQA/MQA, L not a multiple of a tile."""
    rng = np.random.default_rng(0)
    q, k, v = (t.astype(np.float32) for t in (np.asarray(x) for x in inputs(*shape)[:3]))
    dout = rng.standard_normal(q.shape[:2] + (q.shape[2] // 2, 2 * q.shape[3])).astype(np.float32)
    ref, ref_lse = oracle(q, k, v, 0.37)
    out, lse = emulate.forward(q, k, v, 0.37, tn=tn)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    dq, dk, dv, dlam = emulate.backward(q, k, v, 0.37, dout, lse, tn=tn)
    ref_grads = diff_v1_oracle(q, k, v, 0.37, dout)
    for g, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        assert close(g, ref_grads[name], 1e-5), name
    assert dlam == pytest.approx(float(ref_grads["lam"]), rel=1e-5)


@pytest.mark.skipif(not emulate.available(), reason="needs g++ (C++20) to build the CPU emulation")
def test_emulated_kernels_read_strided_views_and_fewer_warps():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32).swapaxes(1, 2) for s in ((1, 4, 21, 16), (1, 2, 21, 16), (1, 1, 21, 32)))
    out, lse = emulate.forward(q, k, v, 0.5, nw=1, bk=16)
    assert rel(out, oracle(q, k, v, 0.5)[0]) <= 1e-5
    dout = rng.standard_normal((1, 21, 2, 32)).astype(np.float32)
    ref_grads = diff_v1_oracle(q, k, v, 0.5, dout)
    for g, name in zip(emulate.backward(q, k, v, 0.5, dout, lse, nw=1, bk=16)[:3], "qkv"):
        assert rel(g, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_composed_and_naive_match_the_oracle(shape):
    q, k, v, lam = inputs(*shape)
    ref, _ = oracle(q, k, v, 0.37)
    with mx.stream(mx.cpu):
        assert rel(diff_v1_composed(q, k, v, lam), ref) <= 1e-5
        assert rel(diff_v1_naive(q, k, v, lam), ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the CUDA build is compiled on the GPU only")
@pytest.mark.parametrize("dtype,d", [("float", 16), ("__nv_bfloat16", 128)])
@pytest.mark.parametrize("name", sorted(kernel.BODIES))
def test_cuda_build_compiles_with_nvcc(tmp_path, dtype, d, name):
    """The signature MLX's cuda_kernel generates around a body (mlx/backend/cuda/custom_kernel.cpp),
    with its Shape/Strides types, compiled for sm_90: catches a body or prelude that is not valid CUDA
    (wmma included). Where MLX's NVRTC finds mma.h is checked only on the GPU."""
    header, source = kernel.source(name, "cuda")
    nw, bk = kernel.tile_config(name, d, "cuda", 4 if dtype == "float" else 2)
    def declare(arg, role):
        element = "float" if arg in ("lam", "lse", "delta") else dtype
        return {"input": f"const {element}* {arg}", "output": f"{element}* {arg}",
                "shape": f"const __grid_constant__ Shape {arg}", "strides": f"const __grid_constant__ Strides {arg}"}[role]

    params = [declare(arg, role) for arg, role in kernel.parameters(name)]
    src = tmp_path / "k.cu"
    src.write_text(f"""#include <cuda/std/array>
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
{header}
__global__ void k({", ".join(params)}) {{
  using T = {dtype};
  constexpr int D = {d}; constexpr int NW = {nw}; constexpr int BK = {bk};
{source}
}}
""")
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- on a GPU --------------------------------------------------------------------------------

DIALECTS = [
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        DIALECT != "cuda", reason="needs MLX's CUDA build on an NVIDIA GPU")]),
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(
        DIALECT != "metal", reason="needs an Apple Silicon GPU (Metal): not run on Linux")]),
]


def fits(name, d, dialect, itemsize):
    """Whether kernel `name`'s tiles fit shared memory at head_dim d (the backward's do not at d128 in float32)."""
    try:
        return bool(kernel.tile_config(name, d, dialect, itemsize))
    except ValueError:
        return False


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}H{}G{}d{}".format(*s))
def test_fused_forward_matches_oracle(dialect, shape):
    """float32 to 1e-5; bf16 to 2e-2 (its 8-bit mantissa); a dtype whose tiles do not fit is refused
    with a ValueError before launch (auto never picks it)."""
    ref, ref_lse = oracle(*inputs(*shape)[:3], 0.37)
    for dtype, tol in ((mx.float32, 1e-5), (mx.bfloat16, 2e-2)):
        args = inputs(*shape, dtype=dtype)
        if not fits("fwd", shape[-1], dialect, dtype.size):
            with pytest.raises(ValueError, match="does not fit"):
                diff_v1_fused_forward(*args, dialect=dialect)
            continue
        out, lse = diff_v1_fused_forward(*args, dialect=dialect)
        assert out.dtype == dtype and rel(out.astype(mx.float32), ref) <= tol and rel(lse, ref_lse) <= tol


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fused_reads_strided_views_in_place(dialect):
    B, L, H, G, d = 2, 23, 2, 1, 32
    rng = np.random.default_rng(3)
    # (B, heads, L, d) arrays seen as (B, L, heads, d), as the model's RoPE output is
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)).swapaxes(1, 2)
               for s in ((B, 2 * H, L, d), (B, 2 * G, L, d), (B, G, L, 2 * d)))
    lam = mx.array(0.5)
    assert rel(diff_v1_fused_forward(q, k, v, lam, dialect=dialect)[0], oracle(q, k, v, 0.5)[0]) <= 1e-5


@pytest.mark.parametrize("dialect", DIALECTS)
def test_fused_gradients_match_composed(dialect):
    q, k, v, lam = inputs(2, 37, 4, 2, 64)
    cot = mx.array(np.random.default_rng(1).standard_normal((2, 37, 4, 128)).astype(np.float32))
    (out,), grads = mx.vjp(diff_v1_fused, [q, k, v, lam], [cot])
    (ref,), ref_grads = mx.vjp(diff_v1_composed, [q, k, v, lam], [cot])
    assert rel(out, ref) <= 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) <= 1e-5


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("shape,dtype,tol", [((1, 100, 2, 1, 128), mx.bfloat16, 2e-2),
                                             ((1, 129, 4, 4, 32), mx.float32, 1e-5),
                                             ((2, 19, 2, 2, 16), mx.bfloat16, 2e-2)], ids=["d128-bf16", "d32-f32", "d16-bf16"])
def test_fused_gradients_match_float64(dialect, shape, dtype, tol):
    """The backward kernels' dq, dk, dv, dlam against the float64 oracle: bf16 inputs to 2e-2 (the
    oracle sees the same rounded inputs), float32 to 1e-5."""
    if not all(fits(n, shape[-1], dialect, dtype.size) for n in kernel.BODIES):
        pytest.skip(f"head_dim {shape[-1]} in {dtype} does not fit {dialect}'s shared memory: composed there")
    q, k, v, lam = inputs(*shape, dtype=dtype)
    cot = mx.array(np.random.default_rng(2).standard_normal(q.shape[:2] + (q.shape[2] // 2, 2 * q.shape[3]))
                   .astype(np.float32)).astype(dtype)
    _, grads = mx.vjp(diff_v1_fused, [q, k, v, lam], [cot])
    f32 = [np.asarray(t.astype(mx.float32)) for t in (q, k, v, cot)]
    ref = diff_v1_oracle(f32[0], f32[1], f32[2], 0.37, f32[3])
    for g, name in zip(grads, ("q", "k", "v", "lam")):
        assert rel(g.astype(mx.float32), ref[name]) <= tol, name


def test_the_gpu_table_writes_every_row_kind():
    """mlx_kernels_table.py's markdown (run only on a GPU): a measured row with its ratios and
    errors, a shape whose fused kernel failed, and training rows, so a GPU call never dies formatting."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scripts" / "mlx_kernels_table.py"
    spec = importlib.util.spec_from_file_location("mlx_kernels_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    flops = 4 * 16 * 6 * 2048 ** 2 * 64
    att = [dict(d=64, L=2048, B=8, H=16, out_err=3e-3, grad_err=5e-3, flops=flops, fused=(2e-3, 8e-3), composed=(3e-3, 9e-3)),
           dict(d=128, L=4096, B=4, H=8, error="head_dim=128 does not fit")]
    train = [dict(preset="small", batch=16, seq=256, attention="diff", dtype="bfloat16", kernels="fused", tps=1e5, ms=41.0)]
    meta = dict(device="GPU", mlx="0", dialect="cuda", commit="abc", command="cmd", steps=20)
    text = table.markdown(att, train, meta)
    rows = [line for line in text.splitlines() if line.startswith("| 64 |") or line.startswith("| 128 |")]
    assert len(rows) == 2 and rows[0].count("|") == rows[1].count("|") == 15
    assert "| 1.50x |" in rows[0] and f"| {flops / 2e-3 / 1e12:.1f} |" in rows[0] and "fused fails: head_dim=128" in rows[1]
    assert "| small | 16 x 256 | diff | bfloat16 | fused | 100000 | 41.00 |" in text
