"""DIFF V1 attention from MLX ops: the composed path (two fused SDPA calls) and the naive one.

q (B, L, 2H, d), k (B, L, 2G, d), v (B, L, G, 2d), lam a float32 scalar -> (B, L, H, 2d)
= A1 v - lam A2 v, causal, scale 1/sqrt(d). Sub-heads 2i, 2i+1 of q are head i's q1, q2; of
k, kv head g's k1, k2; head i reads kv head i // (H/G). subln and (1 - lambda_init) are the
model's business.
"""
import math

import mlx.core as mx


def diff_v1_composed(q, k, v, lam):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)   # (B, heads, L, dim)
    scale = 1.0 / math.sqrt(q.shape[-1])
    a1 = mx.fast.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], v, scale=scale, mask="causal")
    a2 = mx.fast.scaled_dot_product_attention(q[:, 1::2], k[:, 1::2], v, scale=scale, mask="causal")
    return combine(a1, a2, lam).swapaxes(1, 2)


def combine(a1, a2, lam):
    # in float32: lam's gradient is a sum over every output element, which bf16 would swamp
    return (a1.astype(mx.float32) - lam * a2.astype(mx.float32)).astype(a1.dtype)


def causal_softmax(q, k):
    """softmax(q k^T / sqrt(d)) with the causal mask, materialised; q (B,H,L,d), k (B,H,L,d)."""
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) / math.sqrt(q.shape[-1])
    L = q.shape[-2]
    mask = mx.arange(L)[:, None] >= mx.arange(L)[None, :]
    return mx.softmax(mx.where(mask, scores, -mx.inf), axis=-1)


def diff_v1_naive(q, k, v, lam):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    rep = q.shape[1] // k.shape[1]   # = H / G
    k1, k2 = (mx.repeat(k[:, m::2], rep, axis=1) for m in (0, 1))
    vr = mx.repeat(v, rep, axis=1)
    a1 = causal_softmax(q[:, 0::2], k1).astype(v.dtype) @ vr
    a2 = causal_softmax(q[:, 1::2], k2).astype(v.dtype) @ vr
    return combine(a1, a2, lam).swapaxes(1, 2)
