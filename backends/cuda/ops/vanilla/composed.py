"""Vanilla causal attention through torch's scaled_dot_product_attention (flash / cuDNN / efficient)."""
import torch.nn.functional as F

from ..checks import vanilla_heads


def _aligned(t):
    """t itself if every stride is a multiple of 16 bytes (the last one 1), else a contiguous copy:
    CUDA's flash SDPA reads misaligned rows without checking (seen on torch 2.11, H100, bf16 GQA:
    a 'misaligned address' fault and garbage output)."""
    step = max(1, 16 // t.element_size())
    ok = t.stride(-1) == 1 and all(s % step == 0 for s in t.stride()[:-1])
    return t if ok else t.contiguous()


def sdpa(q, k, v):
    """q (B, L, Hq, d), k (B, L, G, d), v (B, L, G, dv) -> (B, Hq, L, dv); Hq a multiple of G (GQA)."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    # a branch, not the comparison itself: under torch.compile's dynamic shapes the comparison is a
    # SymBool, which SDPA's enable_gqa refuses (a graph break at every call); branching on it makes
    # dynamo guard on the head counts, which are the model's and never change
    gqa = True if q.shape[2] != k.shape[2] else False
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=gqa)


def attention(q, k, v):
    vanilla_heads(q, k, v)
    return sdpa(q, k, v).transpose(1, 2).contiguous()
