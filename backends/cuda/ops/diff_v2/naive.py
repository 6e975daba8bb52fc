"""DIFF V2 attention, materialized: 2H query heads over G kv heads, pairs combined by the token-wise lambda."""
from ..checks import diff_v2_heads
from ..vanilla.naive import causal_softmax_attention, heads_first


def attention(q, k, v, lam):
    B, L, H, G, d = diff_v2_heads(q, k, v, lam)
    group = 2 * H // G
    a = causal_softmax_attention(q.transpose(1, 2), heads_first(k, group), heads_first(v, group))  # (B, 2H, L, d)
    out = a[:, 0::2] - lam.transpose(1, 2)[..., None] * a[:, 1::2]
    return out.transpose(1, 2).contiguous().to(q.dtype)
