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

from diffattn.numerics import rel_error

mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install 'diffattn[mlx]')")

from backends.mlx.ops import (diff_v1_composed, diff_v1_fused, diff_v1_fused_forward,  # noqa: E402
                                       diff_v1_naive, gpu_dialect)
from backends.mlx.ops.diff_v1 import kernel  # noqa: E402

DIALECT = gpu_dialect()
SHAPES = [  # B, L, H, G, d: L = 1, below, above and not a multiple of every block size
    (1, 1, 2, 1, 16), (2, 37, 4, 2, 64), (1, 100, 2, 1, 128), (1, 129, 4, 4, 32), (2, 19, 2, 2, 8)]


def oracle(q, k, v, lam):
    """float64 numpy: out (B,L,H,2d) and lse (B,L,H,2) of DIFF V1, from (B,L,heads,dim) inputs."""
    q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
    B, H2, L, d = q.shape
    rep = (H2 // 2) // (k.shape[1] // 2)
    mask = np.tril(np.ones((L, L), bool))
    outs, lses = [], []
    for m in (0, 1):
        s = q[:, m::2] @ np.repeat(k[:, m::2], rep, axis=1).transpose(0, 1, 3, 2) / np.sqrt(d)
        s = np.where(mask, s, -np.inf)
        lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
        outs.append(np.exp(s - lse[..., None]) @ np.repeat(v, rep, axis=1))
        lses.append(lse)
    return (outs[0] - lam * outs[1]).transpose(0, 2, 1, 3), np.stack(lses, -1).transpose(0, 2, 1, 3)


def inputs(B, L, H, G, d, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((B, L, 2 * H, d)), rng.standard_normal((B, L, 2 * G, d))
    v = rng.standard_normal((B, L, G, 2 * d))
    return [mx.array(t.astype(np.float32)).astype(dtype) for t in (q, k, v)] + [mx.array(0.37)]


rel = rel_error  # ||a - ref|| / ||ref||


# ---- everywhere ------------------------------------------------------------------------------

def test_kernel_body_is_dialect_neutral():
    for token in ("threadgroup", "simd_", "metal::", "__syncthreads", "__shfl", "threadIdx", "blockIdx", "__shared__"):
        assert token not in kernel.BODY, token
    metal_header, metal_src = kernel.source("metal")
    cuda_header, cuda_src = kernel.source("cuda")
    assert metal_src.endswith(kernel.BODY) and cuda_src.endswith(kernel.BODY)
    for macro in ("SHARED", "BARRIER()", "WARP_SYNC()", "SHFL_XOR(", "EXP2(", "LOG2(", "idx_t"):
        assert macro in metal_header and macro in cuda_header, macro


@pytest.mark.parametrize("dialect,budget", [("metal", 32768), ("cuda", 49152)])
def test_tiles_fit_the_shared_memory_budget(dialect, budget):
    for d in (8, 16, 32, 64, 128):
        bq, nw = kernel.tile_config(d, dialect)
        floats = bq * 2 * d + 2 * 16 * (d + 1) + bq * 38
        assert floats * 4 <= budget and bq % nw == 0


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_composed_and_naive_match_the_oracle(shape):
    q, k, v, lam = inputs(*shape)
    ref, _ = oracle(q, k, v, 0.37)
    with mx.stream(mx.cpu):
        assert rel(diff_v1_composed(q, k, v, lam), ref) <= 1e-5
        assert rel(diff_v1_naive(q, k, v, lam), ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: the CUDA build is compiled on the GPU only")
@pytest.mark.parametrize("dtype,d", [("float", 8), ("__nv_bfloat16", 128)])
def test_cuda_build_compiles_with_nvcc(tmp_path, dtype, d):
    """The signature MLX's cuda_kernel generates around the body (mlx/backend/cuda/custom_kernel.cpp),
    with its Shape/Strides types, compiled for sm_90: catches a body that is not valid CUDA."""
    header, source = kernel.source("cuda")
    bq, nw = kernel.tile_config(d, "cuda")
    src = tmp_path / "k.cu"
    src.write_text(f"""#include <cuda_bf16.h>
#include <cuda/std/array>
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
{header}
__global__ void k(const {dtype}* q, const __grid_constant__ Shape q_shape, const __grid_constant__ Strides q_strides,
    const {dtype}* k, const __grid_constant__ Shape k_shape, const __grid_constant__ Strides k_strides,
    const {dtype}* v, const __grid_constant__ Strides v_strides, const float* lam, {dtype}* out, float* lse) {{
  using T = {dtype};
  constexpr int D = {d}; constexpr int BQ = {bq}; constexpr int NW = {nw};
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


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}H{}G{}d{}".format(*s))
def test_fused_forward_matches_oracle(dialect, shape):
    q, k, v, lam = inputs(*shape)
    ref, ref_lse = oracle(q, k, v, 0.37)
    out, lse = diff_v1_fused_forward(q, k, v, lam, dialect=dialect)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    out16, _ = diff_v1_fused_forward(*inputs(*shape, dtype=mx.bfloat16), dialect=dialect)
    assert out16.dtype == mx.bfloat16 and rel(out16.astype(mx.float32), ref) <= 2e-2


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
