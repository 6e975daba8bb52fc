"""Float64 numpy oracles of the three attention variants with their gradients, built on diffattn.spec.

(B, L, heads, d) in and out, as the projections give them; each returns the output and the
gradients of <do, out> with respect to every input. Shared by the PyTorch and MLX kernel tests.
"""
import math

import numpy as np

from diffattn import spec


def _hf(t):  # (B, L, n, d) -> (B, n, L, d), in float64 whatever the caller's dtype
    return np.ascontiguousarray(np.asarray(t, np.float64).transpose(0, 2, 1, 3))


def _lf(t):  # (B, n, L, d) -> (B, L, n, d)
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3))


def vanilla_oracle(q, k, v, do):
    q, k, v, do = map(_hf, (q, k, v, do))
    group = q.shape[1] // k.shape[1]
    kr, vr, scale = spec.repeat_kv(k, group), spec.repeat_kv(v, group), 1 / math.sqrt(q.shape[-1])
    o, p = spec.causal_attention(q, kr, vr, scale)
    dq, dkr, dvr = spec.causal_attention_backward(q, kr, vr, p, do, scale)
    return dict(out=_lf(o), q=_lf(dq), k=_lf(spec.repeat_kv_backward(dkr, group)),
                v=_lf(spec.repeat_kv_backward(dvr, group)))


def diff_v1_oracle(q, k, v, lam, do):
    """out_i = A1 v_g - lam A2 v_g over sub-heads (2i, 2i+1) of q and (2g, 2g+1) of k."""
    q, k, v, do = map(_hf, (q, k, v, do))
    group = q.shape[1] // 2 // v.shape[1]
    scale = 1 / math.sqrt(q.shape[-1])
    vr = spec.repeat_kv(v, group)
    k1r, k2r = spec.repeat_kv(k[:, 0::2], group), spec.repeat_kv(k[:, 1::2], group)
    o1, p1 = spec.causal_attention(q[:, 0::2], k1r, vr, scale)
    o2, p2 = spec.causal_attention(q[:, 1::2], k2r, vr, scale)
    dq1, dk1r, dv1 = spec.causal_attention_backward(q[:, 0::2], k1r, vr, p1, do, scale)
    dq2, dk2r, dv2 = spec.causal_attention_backward(q[:, 1::2], k2r, vr, p2, -lam * do, scale)
    dq, dk = np.empty_like(q), np.empty_like(k)
    dq[:, 0::2], dq[:, 1::2] = dq1, dq2
    dk[:, 0::2], dk[:, 1::2] = spec.repeat_kv_backward(dk1r, group), spec.repeat_kv_backward(dk2r, group)
    return dict(out=_lf(o1 - lam * o2), q=_lf(dq), k=_lf(dk), v=_lf(spec.repeat_kv_backward(dv1 + dv2, group)),
                lam=np.array(-np.sum(do * o2)))


def diff_v1_forward_oracle(q, k, v, lam):
    """(out (B, L, H, 2d), lse (B, L, H, 2)): DIFF V1's output and each map's natural-log
    log-sum-exp of its causal scaled scores, what the fused kernels save for their backward."""
    q, k, v = map(_hf, (q, k, v))
    group = q.shape[1] // 2 // v.shape[1]
    scale, L = 1 / math.sqrt(q.shape[-1]), q.shape[2]
    vr = spec.repeat_kv(v, group)
    outs, lses = [], []
    for m in (0, 1):
        qm, km = q[:, m::2], spec.repeat_kv(k[:, m::2], group)
        o, _ = spec.causal_attention(qm, km, vr, scale)
        s = np.where(np.triu(np.ones((L, L), bool), 1), -np.inf, qm @ km.transpose(0, 1, 3, 2) * scale)
        top = s.max(-1, keepdims=True)
        outs.append(o)
        lses.append((np.log(np.exp(s - top).sum(-1, keepdims=True)) + top)[..., 0])
    return _lf(outs[0] - lam * outs[1]), np.stack(lses, -1).transpose(0, 2, 1, 3)


def diff_v2_oracle(q, k, v, lam, do):
    """out_i = a_{2i} - lam_i a_{2i+1}, query head j on kv head j // (2H / G)."""
    q, k, v, do = map(_hf, (q, k, v, do))
    group = q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1])
    lam_h = lam.transpose(0, 2, 1)[..., None]  # (B, H, L, 1)
    kr, vr = spec.repeat_kv(k, group), spec.repeat_kv(v, group)
    a, p = spec.causal_attention(q, kr, vr, scale)
    da = np.empty_like(a)
    da[:, 0::2], da[:, 1::2] = do, -lam_h * do
    dq, dkr, dvr = spec.causal_attention_backward(q, kr, vr, p, da, scale)
    dlam = -np.sum(do * a[:, 1::2], -1).transpose(0, 2, 1)  # (B, L, H)
    return dict(out=_lf(a[:, 0::2] - lam_h * a[:, 1::2]), q=_lf(dq), k=_lf(spec.repeat_kv_backward(dkr, group)),
                v=_lf(spec.repeat_kv_backward(dvr, group)), lam=dlam)
