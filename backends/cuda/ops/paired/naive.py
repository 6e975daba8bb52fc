"""The paired-softmax op's contract, materialized in torch: what forward() of launch.py returns.

    attention(q (B,L,2H,D), k (B,L,KH,D), v (B,L,G,DV), lam_rows (B,L,H), k_step, shared_k)
        -> out (B,L,H,DV) = o1 - lam o2,  o2 (B,L,H,DV),  lse (B,H,2,L) float32

lse[:, i, m] is map m's log-sum-exp of the scaled scores in base 2 (log2 sum_j 2^(s_j log2(e) / sqrt(D))),
what the backward kernels re-derive the probabilities from. Computed in float64 whatever the
inputs' dtype (a reference for tests, not a fast path).
"""
import math

import torch


def attention(q, k, v, lam_rows, k_step, shared_k):
    B, L, H2, D = q.shape
    H, G = H2 // 2, v.shape[2]
    group = H // G
    q, k, v, lam = (t.double() for t in (q, k, v, lam_rows))
    g = torch.arange(H) // group  # each output head's kv head
    k1 = k[:, :, g * k_step]  # (B, L, H, D)
    k2 = k1 if shared_k else k[:, :, g * k_step + 1]
    vh = v[:, :, g]
    visible = torch.ones(L, L, dtype=torch.bool).tril()
    outs, lses = [], []
    for qm, km in ((q[:, :, 0::2], k1), (q[:, :, 1::2], k2)):
        s = torch.einsum("blhd,bmhd->bhlm", qm, km) / math.sqrt(D)
        s = s.masked_fill(~visible, float("-inf"))
        lses.append(torch.logsumexp(s, -1) / math.log(2))  # (B, H, L), base 2
        outs.append(torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), vh))
    o1, o2 = outs
    out = o1 - lam[..., None] * o2
    return out, o2, torch.stack(lses, 2).float()
