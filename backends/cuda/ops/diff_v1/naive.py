"""DIFF V1 attention as the paper writes it: two materialized softmax maps, subtracted."""
from ..checks import diff_v1_heads
from ..vanilla.naive import causal_softmax_attention, heads_first


def attention(q, k, v, lam):
    B, L, H, G, d = diff_v1_heads(q, k, v, lam)
    group = H // G
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, 2H, L, d), (B, 2G, L, d)
    vr = heads_first(v, group)
    a1 = causal_softmax_attention(q[:, 0::2], k[:, 0::2].repeat_interleave(group, 1), vr)
    a2 = causal_softmax_attention(q[:, 1::2], k[:, 1::2].repeat_interleave(group, 1), vr)
    return (a1 - lam * a2).transpose(1, 2).contiguous().to(q.dtype)
