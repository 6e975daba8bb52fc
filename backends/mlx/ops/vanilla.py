"""Vanilla causal attention: q (B, L, H, d), k/v (B, L, G, d) -> (B, L, H, d)."""
import math

import mlx.core as mx

from backends.mlx.ops.diff_v1.composed import causal_softmax


def vanilla_composed(q, k, v):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask="causal")
    return o.swapaxes(1, 2)


def vanilla_naive(q, k, v):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    rep = q.shape[1] // k.shape[1]
    a = causal_softmax(q, mx.repeat(k, rep, axis=1))
    return (a.astype(v.dtype) @ mx.repeat(v, rep, axis=1)).swapaxes(1, 2)
