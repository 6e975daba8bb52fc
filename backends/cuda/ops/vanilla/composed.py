"""Vanilla causal attention through torch's scaled_dot_product_attention (flash / cuDNN / efficient)."""
import torch.nn.functional as F

from ..checks import vanilla_heads


def sdpa(q, k, v):
    """q (B, L, Hq, d), k (B, L, G, d), v (B, L, G, dv) -> (B, Hq, L, dv); Hq a multiple of G (GQA)."""
    gqa = q.shape[2] != k.shape[2]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=gqa)


def attention(q, k, v):
    vanilla_heads(q, k, v)
    return sdpa(q, k, v).transpose(1, 2).contiguous()
