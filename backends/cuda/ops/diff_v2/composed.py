"""DIFF V2 attention as one grouped-query SDPA call over the 2H query heads plus the lambda combine."""
from ..checks import diff_v2_heads
from ..vanilla.composed import sdpa


def maps(q, k, v):
    """Both query heads' softmax outputs, (B, 2H, L, d), the pairs interleaved: the SDPA call alone."""
    return sdpa(q, k, v)


def attention(q, k, v, lam):
    diff_v2_heads(q, k, v, lam)
    a = maps(q, k, v)
    out = a[:, 0::2] - lam.transpose(1, 2)[..., None] * a[:, 1::2]
    return out.transpose(1, 2).contiguous().to(q.dtype)
