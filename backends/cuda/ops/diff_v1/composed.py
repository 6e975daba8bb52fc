"""DIFF V1 attention as two SDPA calls plus the lambda combine.

V's head dim is twice q's: SDPA's flash backend refuses that, so torch picks cuDNN or the
memory-efficient kernel (or the math fallback on CPU).
"""
from ..checks import diff_v1_heads
from ..vanilla.composed import sdpa


def maps(q, k, v):
    """The two softmax maps' outputs, each (B, H, L, 2d): the SDPA calls alone."""
    return sdpa(q[:, :, 0::2], k[:, :, 0::2], v), sdpa(q[:, :, 1::2], k[:, :, 1::2], v)


def attention(q, k, v, lam):
    diff_v1_heads(q, k, v, lam)
    a1, a2 = maps(q, k, v)
    return (a1 - lam * a2).transpose(1, 2).contiguous().to(q.dtype)
