"""DIFF V2 attention: q (B, L, 2H, d), k/v (B, L, G, d), lam (B, L, H) -> (B, L, H, d).

Query heads 2i, 2i+1 form head i: o_i = a_{2i} - lam_i * a_{2i+1}; query head j reads kv
head j // (2H/G) (ordinary GQA over the 2H query heads). lam = sigmoid(lambda_proj(x)).
"""
import math

import mlx.core as mx

from backends.mlx.ops.diff_v1.composed import causal_softmax


def _combine(a, lam):
    # a (B, 2H, L, d), lam (B, L, H) -> (B, L, H, d)
    lam = lam.swapaxes(1, 2)[..., None].astype(a.dtype)
    return (a[:, 0::2] - lam * a[:, 1::2]).swapaxes(1, 2)


def diff_v2_composed(q, k, v, lam):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    a = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask="causal")
    return _combine(a, lam)


def diff_v2_naive(q, k, v, lam):
    q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)
    rep = q.shape[1] // k.shape[1]
    a = causal_softmax(q, mx.repeat(k, rep, axis=1)).astype(v.dtype) @ mx.repeat(v, rep, axis=1)
    return _combine(a, lam)
