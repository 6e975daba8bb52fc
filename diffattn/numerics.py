"""The relative error every check and table reports, in one place.

    rel_error(a, ref) = ||a - ref|| / ||ref||   (Frobenius norms, computed in float64)

a and ref may be numpy arrays, MLX arrays or torch tensors (a torch pair is reduced on its device,
so a GPU table does not copy its tensors to the host); a shape mismatch is an infinite error, and
a zero ref divides by 1e-30 rather than by zero.
"""
from __future__ import annotations

import numpy as np


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _host(x):
    """numpy float64 of a numpy, MLX or torch array (bfloat16 ones first widened, which numpy lacks)."""
    if _is_torch(x):
        return x.detach().double().cpu().numpy()
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx
        return np.asarray(x.astype(mx.float32), np.float64)
    return np.asarray(x, np.float64)


def rel_error(a, ref) -> float:
    if _is_torch(a) and _is_torch(ref):
        a, ref = a.detach().double(), ref.detach().to(a.device).double()
        if a.shape != ref.shape:
            return float("inf")
        return float((a - ref).norm() / (ref.norm().clamp_min(1e-30)))
    a, ref = (_host(x) for x in (a, ref))
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))
