"""Causal attention cores of the three variants, each in three implementations.

    vanilla_attention(q, k, v, impl)          q (B,L,H,d)   k, v (B,L,G,d)             -> (B,L,H,d)
    diff_v1_attention(q, k, v, lam, impl)     q (B,L,2H,d)  k (B,L,2G,d)  v (B,L,G,2d) -> (B,L,H,2d)
    diff_v2_attention(q, k, v, lam, impl)     q (B,L,2H,d)  k, v (B,L,G,d), lam (B,L,H) -> (B,L,H,d)

Inputs are already RoPE'd, in the (batch, position, head, dim) layout the projections give (any
strides); scale is 1/sqrt(d); the output is contiguous in q's dtype. `lam` is a 0-dim tensor for
DIFF V1 and the sigmoid'd token-wise lambda for V2; gradients flow to q, k, v and lam.
impl: "naive" (materialized softmax, the paper's form), "composed" (PyTorch SDPA + elementwise),
"fused" (Triton; for vanilla, SDPA's own fused kernel: there is no DIFF-specific work to fuse).
DIFF V1 takes norm=(weight (2d,), eps): the output then goes through RMSNorm over its last dim
(the model's subln, weight already scaled by 1 - lambda_init); "fused" does it in the kernels.
The DIFF ops take options: the fused kernels' KernelOptions (paired/tuning.py; None = the
defaults), which the other impls ignore.

The fused path also takes its q, k, v from one op, split_heads (rope.py): the qkv projection split
into heads, q and k rotated, in a Triton kernel each way.
"""
from .checks import IMPLS, check_impl, check_norm
from .norm import rms_norm
from .vanilla import naive as _vanilla_naive, composed as _vanilla_composed
from .diff_v1 import naive as _v1_naive, composed as _v1_composed
from .diff_v2 import naive as _v2_naive, composed as _v2_composed

__all__ = ["IMPLS", "vanilla_attention", "diff_v1_attention", "diff_v2_attention", "split_heads"]


def vanilla_attention(q, k, v, impl="composed"):
    check_impl(impl, q)
    if impl == "naive":
        return _vanilla_naive.attention(q, k, v)
    return _vanilla_composed.attention(q, k, v)


def diff_v1_attention(q, k, v, lam, impl="composed", norm=None, options=None):
    check_impl(impl, q)
    if norm is not None:
        check_norm(norm, v)
    if impl == "fused":
        if v.shape[-1] != 2 * q.shape[-1]:
            raise ValueError("impl 'fused' implements DIFF V1's split layout (v of twice q's head dim); "
                             f"got q head dim {q.shape[-1]}, v {v.shape[-1]}: use 'composed' or 'naive'")
        from .diff_v1 import fused
        return fused.attention(q, k, v, lam, norm, options or fused.DEFAULT)
    out = (_v1_naive if impl == "naive" else _v1_composed).attention(q, k, v, lam)
    return out if norm is None else rms_norm(out, *norm)


def diff_v2_attention(q, k, v, lam, impl="composed", options=None):
    check_impl(impl, q)
    if impl == "naive":
        return _v2_naive.attention(q, k, v, lam)
    if impl == "composed":
        return _v2_composed.attention(q, k, v, lam)
    from .diff_v2 import fused
    return fused.attention(q, k, v, lam, options or fused.DEFAULT)


def split_heads(qkv, cos, sin, q_heads, k_heads, v_heads, head_dim):
    """q, k, v (B, L, heads, dim) from the qkv projection (B, L, C), q and k rotated (Triton; rope.py)."""
    from . import rope
    return rope.split_heads(qkv, cos, sin, q_heads, k_heads, v_heads, head_dim)
