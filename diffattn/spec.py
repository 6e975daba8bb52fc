"""The executable specification: every op and the whole model in numpy, with hand-written backward.

This is the single definition both backends are tested against. It computes in float64 by
default (pass dtype=np.float32 to compute in float32). Layouts inside: activations (B, L, D),
heads (B, heads, L, dim). Parameters are dicts of canonical names (diffattn/params.py); the
attention functions take one layer's tensors under their short names (q_proj.weight, ...).

Each op comes as a forward `f(...)` and, where the model needs it, `f_backward(...)` taking the
forward's inputs (or cache) and the upstream gradient. The attention backward is the oracle the
fused kernels' backward is tested against.

`lambda_mix` (default 1) scales the negative map's weight of both DIFF variants: V1 combines
A1 V - mix * lambda * A2 V, V2 a_even - mix * lambda_t * a_odd. Training ramps it 0 -> 1 for a
converted model (TrainConfig.lambda_warmup_steps); it is a number the caller passes, not a
parameter, and at 1 the model is the paper's.
"""
from __future__ import annotations

import math

import numpy as np

from diffattn.config import ModelConfig

# ---- elementwise and normalisation ----------------------------------------------------------


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rmsnorm_backward(x, w, eps, dy):
    """Returns (dx, dw); dw summed over all leading dimensions."""
    r = 1.0 / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    xhat = x * r
    dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0)
    g = dy * w
    dx = r * (g - xhat * np.mean(g * xhat, -1, keepdims=True))
    return dx, dw


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form


def silu(x):
    return x * sigmoid(x)


def silu_backward(x, dy):
    s = sigmoid(x)
    return dy * s * (1.0 + x * (1.0 - s))


# ---- rotary embedding (interleaved, GPT-J form) ---------------------------------------------


def rope_tables(seq_len: int, dim: int, theta: float = 10000.0, dtype=np.float64):
    """cos, sin of shape (seq_len, dim/2): angle = pos * theta^(-2i/dim)."""
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angle = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (2i, 2i+1) of the last axis of x (..., L, dim) by the tables (L, dim/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def apply_rope_backward(dy, cos, sin):
    return apply_rope(dy, cos, -sin)  # a rotation's transpose is the rotation by minus the angle


# ---- causal softmax attention, materialized ---------------------------------------------------


def causal_attention(q, k, v, scale):
    """q, k (B, h, L, d), v (B, h, L, dv) -> (out (B, h, L, dv), probabilities (B, h, L, L))."""
    L = q.shape[-2]
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    s = np.where(np.triu(np.ones((L, L), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v, p


def causal_attention_backward(q, k, v, p, do, scale):
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq = (ds @ k) * scale
    dk = (np.swapaxes(ds, -1, -2) @ q) * scale
    return dq, dk, dv


def repeat_kv(t, group):
    """(B, G, L, d) -> (B, G*group, L, d): query head h reads kv head h // group."""
    return np.repeat(t, group, axis=1)


def repeat_kv_backward(dt, group):
    B, H, L, d = dt.shape
    return dt.reshape(B, H // group, group, L, d).sum(2)


# ---- attention layers ------------------------------------------------------------------------


def _heads(t, n):
    """(B, L, n*d) -> (B, n, L, d)."""
    B, L, _ = t.shape
    return t.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def _merge(t):
    """(B, n, L, d) -> (B, L, n*d)."""
    B, n, L, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, L, n * d)


def diff_lambda(cfg: ModelConfig, layer: int, p):
    """DIFF V1: lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init(layer); returns (lambda, e1, e2)."""
    e1 = np.exp(np.sum(p["lambda_q1"] * p["lambda_k1"]))
    e2 = np.exp(np.sum(p["lambda_q2"] * p["lambda_k2"]))
    return e1 - e2 + cfg.lambda_init(layer), e1, e2


def _attention_forward(cfg: ModelConfig, layer: int, p, x, mix=1.0):
    """Returns (out, cache). See diffattn/config.py for the head layout of each variant."""
    B, L, D = x.shape
    hd, att = cfg.head_dim, cfg.attention
    cos, sin = rope_tables(L, hd, cfg.rope_theta, x.dtype)
    scale = 1.0 / math.sqrt(hd)
    q = apply_rope(_heads(x @ p["q_proj.weight"].T, cfg.q_heads), cos, sin)
    k = apply_rope(_heads(x @ p["k_proj.weight"].T, cfg.k_heads), cos, sin)
    v = _heads(x @ p["v_proj.weight"].T, cfg.kv_heads)
    c = dict(x=x, q=q, k=k, v=v, cos=cos, sin=sin, scale=scale, mix=mix)
    if att == "vanilla":
        group = cfg.n_heads // cfg.kv_heads
        c["kr"], c["vr"] = repeat_kv(k, group), repeat_kv(v, group)
        o, c["p"] = causal_attention(q, c["kr"], c["vr"], scale)
        y = o
    elif att == "diff":
        group = cfg.n_heads // cfg.kv_heads
        c["vr"] = repeat_kv(v, group)
        c["k1r"], c["k2r"] = repeat_kv(k[:, 0::2], group), repeat_kv(k[:, 1::2], group)
        o1, c["p1"] = causal_attention(q[:, 0::2], c["k1r"], c["vr"], scale)
        o2, c["p2"] = causal_attention(q[:, 1::2], c["k2r"], c["vr"], scale)
        lam, c["e1"], c["e2"] = diff_lambda(cfg, layer, p)
        o = o1 - mix * lam * o2
        c.update(o=o, o1=o1, o2=o2, lam=lam)
        y = rmsnorm(o, p["subln.weight"], cfg.norm_eps) * (1.0 - cfg.lambda_init(layer)) if cfg.diff_subln else o
    else:  # diff_v2
        group = cfg.q_heads // cfg.kv_heads
        c["kr"], c["vr"] = repeat_kv(k, group), repeat_kv(v, group)
        a, c["p"] = causal_attention(q, c["kr"], c["vr"], scale)
        lam = sigmoid(x @ p["lambda_proj.weight"].T).transpose(0, 2, 1)[..., None]  # (B, H, L, 1)
        c.update(a=a, lam=lam)
        y = a[:, 0::2] - mix * lam * a[:, 1::2]
    c["y"] = _merge(y)
    return c["y"] @ p["out_proj.weight"].T, c


def _diff_combine_backward(cfg: ModelConfig, layer: int, p, c, dy):
    """DIFF V1, back through y = subln(o) * (1 - lambda_init): (dL/do, dL/d subln.weight); y = o
    without subln: (dy, None)."""
    if not cfg.diff_subln:
        return dy, None
    return rmsnorm_backward(c["o"], p["subln.weight"], cfg.norm_eps, dy * (1.0 - cfg.lambda_init(layer)))


def _attention_backward(cfg: ModelConfig, layer: int, p, c, grad_out):
    """Returns (grad_x, grads by short name) for the forward that produced cache c."""
    x, att = c["x"], cfg.attention
    grads = {"out_proj.weight": np.einsum("blo,bli->oi", grad_out, c["y"])}
    dy = _heads(grad_out @ p["out_proj.weight"], cfg.n_heads)
    dx = np.zeros_like(x)
    if att == "vanilla":
        group = cfg.n_heads // cfg.kv_heads
        dq, dkr, dvr = causal_attention_backward(c["q"], c["kr"], c["vr"], c["p"], dy, c["scale"])
        dk, dv = repeat_kv_backward(dkr, group), repeat_kv_backward(dvr, group)
    elif att == "diff":
        group = cfg.n_heads // cfg.kv_heads
        do, dsubln = _diff_combine_backward(cfg, layer, p, c, dy)
        if dsubln is not None:
            grads["subln.weight"] = dsubln
        mix = c["mix"]
        dlam = -mix * np.sum(do * c["o2"])
        q, k = c["q"], c["k"]
        dq1, dk1r, dv1 = causal_attention_backward(q[:, 0::2], c["k1r"], c["vr"], c["p1"], do, c["scale"])
        dq2, dk2r, dv2 = causal_attention_backward(q[:, 1::2], c["k2r"], c["vr"], c["p2"], -mix * c["lam"] * do, c["scale"])
        dq, dk = np.empty_like(q), np.empty_like(k)
        dq[:, 0::2], dq[:, 1::2] = dq1, dq2
        dk[:, 0::2], dk[:, 1::2] = repeat_kv_backward(dk1r, group), repeat_kv_backward(dk2r, group)
        dv = repeat_kv_backward(dv1 + dv2, group)
        e1, e2 = c["e1"], c["e2"]
        grads["lambda_q1"] = dlam * e1 * p["lambda_k1"]
        grads["lambda_k1"] = dlam * e1 * p["lambda_q1"]
        grads["lambda_q2"] = -dlam * e2 * p["lambda_k2"]
        grads["lambda_k2"] = -dlam * e2 * p["lambda_q2"]
    else:  # diff_v2
        group = cfg.q_heads // cfg.kv_heads
        a, lam, mix = c["a"], c["lam"], c["mix"]
        da = np.empty_like(a)
        da[:, 0::2], da[:, 1::2] = dy, -mix * lam * dy
        dlam = -mix * np.sum(dy * a[:, 1::2], -1, keepdims=True)  # (B, H, L, 1)
        dlogit = (dlam * lam * (1.0 - lam))[..., 0].transpose(0, 2, 1)  # (B, L, H)
        grads["lambda_proj.weight"] = np.einsum("blh,bli->hi", dlogit, x)
        dx += dlogit @ p["lambda_proj.weight"]
        dq, dkr, dvr = causal_attention_backward(c["q"], c["kr"], c["vr"], c["p"], da, c["scale"])
        dk, dv = repeat_kv_backward(dkr, group), repeat_kv_backward(dvr, group)
    dq = _merge(apply_rope_backward(dq, c["cos"], c["sin"]))
    dk = _merge(apply_rope_backward(dk, c["cos"], c["sin"]))
    dv = _merge(dv)
    for name, d in (("q_proj.weight", dq), ("k_proj.weight", dk), ("v_proj.weight", dv)):
        grads[name] = np.einsum("blo,bli->oi", d, x)
        dx += d @ p[name]
    return dx, grads


def _cast(p, dtype):
    return {k: np.asarray(v, dtype) for k, v in p.items()}


def attention(cfg: ModelConfig, layer: int, p, x, dtype=np.float64):
    """One attention layer's output for input x (B, L, D); positions 0..L-1."""
    return _attention_forward(cfg, layer, _cast(p, dtype), np.asarray(x, dtype))[0]


def attention_vjp(cfg: ModelConfig, layer: int, p, x, grad_out, dtype=np.float64):
    """(out, grad_x, grads) of one attention layer for upstream gradient grad_out."""
    p = _cast(p, dtype)
    out, cache = _attention_forward(cfg, layer, p, np.asarray(x, dtype))
    dx, grads = _attention_backward(cfg, layer, p, cache, np.asarray(grad_out, dtype))
    return out, dx, grads


def lambda_grad_condition(cfg: ModelConfig, layer: int, p, x, grad_out) -> float:
    """||t||_2 / |sum t| for the reduction dL/dlambda = -sum(t), t = dO * O2 (DIFF V1).

    With independent relative errors of size e in the terms, the gradient's relative error is
    about e * this ratio: it measures how much the near cancellation amplifies rounding.
    """
    p = _cast(p, np.float64)
    _, c = _attention_forward(cfg, layer, p, np.asarray(x, np.float64))
    dy = _heads(np.asarray(grad_out, np.float64) @ p["out_proj.weight"], cfg.n_heads)
    do, _ = _diff_combine_backward(cfg, layer, p, c, dy)
    t = do * c["o2"]
    return float(np.sqrt(np.sum(t * t)) / max(abs(t.sum()), 1e-300))


# ---- the model --------------------------------------------------------------------------------


def _layer(params, i):
    prefix = f"layers.{i}.attn."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _forward(cfg: ModelConfig, params, tokens, lambda_mix=1.0):
    """Logits (B, L, V) for int tokens (B, L), and the cache the backward needs."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq_len), got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    eps = cfg.norm_eps
    x = params["embed.weight"][tokens]
    caches = []
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        a_in = rmsnorm(x, params[pre + "attn_norm.weight"], eps)
        a_out, a_cache = _attention_forward(cfg, i, _layer(params, i), a_in, lambda_mix)
        x1 = x + a_out
        m_in = rmsnorm(x1, params[pre + "mlp_norm.weight"], eps)
        gate, up = m_in @ params[pre + "mlp.w1.weight"].T, m_in @ params[pre + "mlp.w3.weight"].T
        hidden = silu(gate) * up
        caches.append(dict(x=x, a_in=a_in, a_cache=a_cache, x1=x1, m_in=m_in, gate=gate, up=up, hidden=hidden))
        x = x1 + hidden @ params[pre + "mlp.w2.weight"].T
    h = rmsnorm(x, params["norm.weight"], eps)
    head = params["embed.weight"] if cfg.tie_embeddings else params["lm_head.weight"]
    return h @ head.T, dict(tokens=tokens, layers=caches, x=x, h=h)


def cross_entropy(logits, targets):
    """Per-token next-token cross-entropy in nats, and the softmax probabilities."""
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    logp = z - lse
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return nll, np.exp(logp)


def model_logits(cfg: ModelConfig, params, tokens, dtype=np.float64, lambda_mix=1.0):
    return _forward(cfg, _cast(params, dtype), tokens, lambda_mix)[0]


def attention_caches(cfg: ModelConfig, params, tokens, dtype=np.float64, lambda_mix=1.0) -> list[dict]:
    """Per layer, the attention forward's intermediates for tokens (B, L): q, k, v after RoPE,
    the softmax maps (vanilla and V2: "p" over every q head; V1: "p1", "p2"), V1's "lam", "o1",
    "o2" (A1 V, A2 V), V2's token-wise "lam" (B, H, L, 1) and "a" (every q head's A V), and "mix".
    What diffattn.diagnostics reads."""
    return [lc["a_cache"] for lc in _forward(cfg, _cast(params, dtype), tokens, lambda_mix)[1]["layers"]]


def token_losses(cfg: ModelConfig, params, batch, dtype=np.float64, lambda_mix=1.0):
    """(B, L) cross-entropy in nats of batch[:, 1:] given batch[:, :-1]."""
    batch = np.asarray(batch)
    logits, _ = _forward(cfg, _cast(params, dtype), batch[:, :-1], lambda_mix)
    return cross_entropy(logits, batch[:, 1:])[0]


def model_loss_and_grads(cfg: ModelConfig, params, batch, dtype=np.float64, lambda_mix=1.0):
    """Mean cross-entropy of the batch (B, L+1) and its gradient for every parameter."""
    params = _cast(params, dtype)
    batch = np.asarray(batch)
    targets = batch[:, 1:]
    logits, c = _forward(cfg, params, batch[:, :-1], lambda_mix)
    nll, probs = cross_entropy(logits, targets)
    eps, n = cfg.norm_eps, nll.size
    dlogits = probs
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(probs, targets[..., None], -1) - 1.0, -1)
    dlogits /= n
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    head_name = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    grads[head_name] += np.einsum("blv,bld->vd", dlogits, c["h"])
    dx, grads["norm.weight"] = rmsnorm_backward(c["x"], params["norm.weight"], eps, dlogits @ params[head_name])
    for i in reversed(range(cfg.n_layers)):
        pre, lc = f"layers.{i}.", c["layers"][i]
        # mlp: x2 = x1 + w2(silu(w1 m) * w3 m)
        grads[pre + "mlp.w2.weight"] = np.einsum("bld,blf->df", dx, lc["hidden"])
        dhidden = dx @ params[pre + "mlp.w2.weight"]
        dgate = silu_backward(lc["gate"], dhidden * lc["up"])
        dup = dhidden * silu(lc["gate"])
        grads[pre + "mlp.w1.weight"] = np.einsum("blf,bld->fd", dgate, lc["m_in"])
        grads[pre + "mlp.w3.weight"] = np.einsum("blf,bld->fd", dup, lc["m_in"])
        dm_in = dgate @ params[pre + "mlp.w1.weight"] + dup @ params[pre + "mlp.w3.weight"]
        dx1, grads[pre + "mlp_norm.weight"] = rmsnorm_backward(lc["x1"], params[pre + "mlp_norm.weight"], eps, dm_in)
        dx1 = dx1 + dx
        # attention: x1 = x + attn(rmsnorm(x))
        da_in, attn_grads = _attention_backward(cfg, i, _layer(params, i), lc["a_cache"], dx1)
        for k, g in attn_grads.items():
            grads[pre + "attn." + k] = g
        dxa, grads[pre + "attn_norm.weight"] = rmsnorm_backward(lc["x"], params[pre + "attn_norm.weight"], eps, da_in)
        dx = dxa + dx1
    np.add.at(grads["embed.weight"], c["tokens"], dx)
    return float(nll.mean()), grads


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Total next-token cross-entropy (nats) over the bytes it covers -> bits per byte."""
    return nats_sum / math.log(2) / n_bytes
