"""The MLX backend: diffattn's spec in MLX (Apple GPUs through Metal; MLX's CUDA build; CPU).

    backend = diffattn.backend.load("mlx", device=None|"cpu"|"gpu", dtype="float32"|"bfloat16"|"float16",
                                    kernels="auto"|"fused"|"composed"|"naive", parallel=None|"none"|"ddp")

kernels: "composed" runs attention through mx.fast.scaled_dot_product_attention, "naive"
materialises the softmax, "fused" uses the DIFF V1 kernel of ops/diff_v1 (GPU only), "auto"
picks per model: fused only where it was measured faster than composed (ops/choice.py), composed
on the CPU. Parameters and optimizer state are float32 whatever
the compute dtype (mixed precision with float32 master weights). No float64: MLX's fast
ops (SDPA, RoPE, RMSNorm) compute in float32 whatever the input. parallel: data parallel over
the processes mlx.launch started (parallel.py); None: "ddp" when it started several.
"""
from __future__ import annotations

import os

from diffattn.backend import BackendError

DTYPES = ("float32", "bfloat16", "float16")


def create(device=None, dtype=None, kernels="auto", parallel=None):
    # MLX's CUDA build runs float32 matmuls as TF32 (10-bit mantissa, ~5e-4 relative) unless told
    # otherwise; the spec wants float32. Read once per process, at MLX's first float32 GEMM.
    os.environ.setdefault("MLX_ENABLE_TF32", "0")
    import mlx.core as mx

    from backends.mlx.ops import gpu_dialect

    if device in ("gpu", "cuda", "metal"):
        if gpu_dialect() is None:
            raise BackendError(f"backend 'mlx': device={device!r} asked for, but MLX sees no GPU (Metal or CUDA)")
        mx.set_default_device(mx.gpu)
    elif device == "cpu":
        mx.set_default_device(mx.cpu)
    elif device is not None:
        raise BackendError(f"backend 'mlx': unknown device {device!r}, expected cpu or gpu")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise BackendError(f"backend 'mlx' computes in one of {DTYPES}, not {dtype}")
    on_gpu = mx.default_device() == mx.gpu and gpu_dialect() is not None
    if kernels == "auto" and not on_gpu:  # on a GPU, resolved per model (MLXBackend.kernels_for)
        kernels = "composed"
    elif kernels == "fused" and not on_gpu:
        raise BackendError("backend 'mlx': kernels='fused' needs a GPU (Metal or MLX's CUDA build); "
                           "use kernels='composed' on the CPU")
    if kernels not in ("auto", "fused", "composed", "naive"):
        raise BackendError(f"backend 'mlx': unknown kernels {kernels!r}, expected auto, fused, composed or naive")
    from backends.mlx.backend import MLXBackend
    from backends.mlx.parallel import DataParallelModel, init

    return MLXBackend(dtype=dtype, kernels=kernels, group=init(parallel), parallel_model=DataParallelModel)
