"""Vanilla causal attention with the softmax materialized (the reference every other form is checked against)."""
import math

import torch

from ..checks import vanilla_heads


def causal_softmax_attention(q, k, v):
    """q, k (B, h, L, d), v (B, h, L, dv) -> (B, h, L, dv); the (L, L) probabilities are materialized.

    Scores in the input dtype, softmax in at least float32 then back (the paper's reference code does the same).
    """
    L = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return p @ v


def heads_first(t, group=1):
    """(B, L, n, d) -> (B, n*group, L, d), each head repeated `group` times in place (GQA)."""
    t = t.transpose(1, 2)
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def attention(q, k, v):
    B, L, H, G, d = vanilla_heads(q, k, v)
    o = causal_softmax_attention(q.transpose(1, 2), heads_first(k, H // G), heads_first(v, H // G))
    return o.transpose(1, 2).contiguous()
