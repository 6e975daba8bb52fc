"""DIFF V2 attention as one grouped-query SDPA call over the 2H query heads plus the lambda combine."""
from ..checks import diff_v2_heads
from ..vanilla.composed import sdpa


def attention(q, k, v, lam):
    diff_v2_heads(q, k, v, lam)
    a = sdpa(q, k, v)  # (B, 2H, L, d)
    out = a[:, 0::2] - lam.transpose(1, 2)[..., None] * a[:, 1::2]
    return out.transpose(1, 2).contiguous().to(q.dtype)
