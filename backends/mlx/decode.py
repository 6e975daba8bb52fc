"""Decoding with a static key/value cache on the MLX backend: prefill, then an mx.compile'd step.

The math is diffattn/decode.py's. The Decoder casts the model's weights to the compute dtype
once (the training model casts at every use) and preallocates per layer

    k (B, m, G, max_len, head_dim)   m = 2 for DIFF V1 (k1 and k2 of each kv head), else 1
    v (B, G, max_len, v_head_dim)

so DIFF caches each key once and both maps read it in place; GQA is SDPA's own (query heads
read their kv head without a copy). Numerics follow backends/mlx/model.py: the residual stream
in the compute dtype, logits float32.

prefill(tokens (B, T)) runs the prompt through the model's attention op (composed / naive /
fused) and writes its keys and values; step(tokens (B,)) attends one query per row to the
whole cache under a mask of the written positions. Its shapes never change and the position
is an array argument, so mx.compile traces it once per (batch, max_len).
"""
from __future__ import annotations

import math

import mlx.core as mx

from diffattn.config import ModelConfig


def _rope(x, cfg: ModelConfig, offset):
    """x (B, heads, T, d) at positions offset.. (int or int32 array), interleaved pairs."""
    return mx.fast.rope(x, cfg.head_dim, traditional=True, base=cfg.rope_theta, scale=1.0, offset=offset)


def pack(model, cdt) -> dict:
    """The weights decoding reads, matrices in the compute dtype."""
    cfg = model.cfg
    layers = []
    for i, b in enumerate(model.layers):
        a = b.attn
        w = {"attn_norm": b.attn_norm.weight.astype(cdt), "mlp_norm": b.mlp_norm.weight.astype(cdt),
             "q": a.q_proj.weight.astype(cdt), "k": a.k_proj.weight.astype(cdt), "v": a.v_proj.weight.astype(cdt),
             "o": a.out_proj.weight.astype(cdt), "w1": b.mlp.w1.weight.astype(cdt),
             "w3": b.mlp.w3.weight.astype(cdt), "w2": b.mlp.w2.weight.astype(cdt)}
        if cfg.attention == "diff":
            w["lam"] = a.lam()
            w["subln"] = a.subln.weight.astype(cdt)
        elif cfg.attention == "diff_v2":
            w["lam_proj"] = a.lambda_proj.weight.astype(cdt)
        layers.append(w)
    head = model.embed.weight if cfg.tie_embeddings else model.lm_head.weight
    return {"layers": layers, "embed": model.embed.weight, "norm": model.norm.weight.astype(cdt),
            "head": head.astype(cdt)}


def _qkv(cfg: ModelConfig, w, h, offset):
    """q (B, q_heads, T, d), k (B, k_heads, T, d) rotated, v (B, G, T, dv) of layer input h (B, T, D)."""
    B, T, _ = h.shape
    q = _rope((h @ w["q"].T).reshape(B, T, cfg.q_heads, cfg.head_dim).swapaxes(1, 2), cfg, offset)
    k = _rope((h @ w["k"].T).reshape(B, T, cfg.k_heads, cfg.head_dim).swapaxes(1, 2), cfg, offset)
    return q, k, (h @ w["v"].T).reshape(B, T, cfg.kv_heads, cfg.v_head_dim).swapaxes(1, 2)


def _cache_layout(cfg: ModelConfig, k):
    """k (B, k_heads, T, d) -> (B, m, G, T, d): kv head g's sub-heads g*m + j at [:, j, g]."""
    B, _, T, d = k.shape
    return k.reshape(B, cfg.kv_heads, -1, T, d).swapaxes(1, 2)


def _subln(cfg: ModelConfig, layer: int, w, o):
    """DIFF V1's per-head RMSNorm and (1 - lambda_init) scale of o (B, T, H, 2d), as the model."""
    return mx.fast.rms_norm(o, w["subln"].astype(o.dtype), cfg.norm_eps) * (1.0 - cfg.lambda_init(layer))


def _v2_lambda(w, h):
    return mx.sigmoid(h @ w["lam_proj"].T)  # (B, T, H), token-wise


def _block(cfg: ModelConfig, i: int, w, x, attend):
    """x += out_proj(attend(w, h)); x += mlp(x). attend -> (B, T, n_heads, v_head_dim)."""
    B, T, _ = x.shape
    h = mx.fast.rms_norm(x, w["attn_norm"], cfg.norm_eps)
    x = x + attend(w, h).reshape(B, T, -1) @ w["o"].T
    m = mx.fast.rms_norm(x, w["mlp_norm"], cfg.norm_eps)
    gate = m @ w["w1"].T
    return x + (gate * mx.sigmoid(gate) * (m @ w["w3"].T)) @ w["w2"].T


def _logits(cfg: ModelConfig, weights, x):
    return (mx.fast.rms_norm(x, weights["norm"], cfg.norm_eps) @ weights["head"].T).astype(mx.float32)


def step_math(cfg: ModelConfig, weights, ks, vs, tokens, pos):
    """tokens (B, 1) at position pos (int32 array (1,)) -> (logits (B, V), new ks, new vs)."""
    S = vs[0].shape[2]
    scale = 1.0 / math.sqrt(cfg.head_dim)
    mask = mx.arange(S)[None, :] <= pos[:, None]  # (1, S): the written positions
    ks, vs = list(ks), list(vs)
    x = weights["embed"][tokens].astype(weights["head"].dtype)
    for i, w in enumerate(weights["layers"]):
        def attend(w, h, i=i):
            q, k, v = _qkv(cfg, w, h, pos[0])
            ks[i] = mx.slice_update(ks[i], _cache_layout(cfg, k).astype(ks[i].dtype), pos, axes=(3,))
            vs[i] = mx.slice_update(vs[i], v.astype(vs[i].dtype), pos, axes=(2,))

            def sdpa(qq, kk):  # (B, heads, 1, dv) -> (B, 1, heads, dv)
                return mx.fast.scaled_dot_product_attention(qq, kk, vs[i], scale=scale, mask=mask).swapaxes(1, 2)
            if cfg.attention == "vanilla":
                return sdpa(q, ks[i][:, 0])
            if cfg.attention == "diff":  # sub-heads 2i, 2i+1 of q are head i's q1, q2
                o1, o2 = sdpa(q[:, 0::2], ks[i][:, 0]), sdpa(q[:, 1::2], ks[i][:, 1])
                o = (o1.astype(mx.float32) - w["lam"] * o2.astype(mx.float32)).astype(o1.dtype)  # as ops' combine
                return _subln(cfg, i, w, o)
            a = sdpa(q, ks[i][:, 0])  # (B, 1, 2H, d): pairs 2i, 2i+1
            return a[:, :, 0::2] - _v2_lambda(w, h)[..., None].astype(a.dtype) * a[:, :, 1::2]
        x = _block(cfg, i, w, x, attend)
    return _logits(cfg, weights, x)[:, -1], ks, vs


class Decoder:
    """Prefill and decode steps of one MLX Transformer over a cache this object owns."""

    def __init__(self, model, compile: bool = True):
        self.cfg, self.model = model.cfg, model
        self.cdt = model.compute_dtype
        self.weights = pack(model, self.cdt)
        mx.eval(self.weights)
        cfg = self.cfg
        fn = lambda w, ks, vs, t, p: step_math(cfg, w, ks, vs, t, p)  # noqa: E731
        self._step = mx.compile(fn) if compile else fn
        self.ks = self.vs = None
        self.batch = self.max_len = self.pos = 0

    def allocate(self, batch: int, max_len: int) -> None:
        cfg = self.cfg
        m, G = cfg.k_heads // cfg.kv_heads, cfg.kv_heads
        self.ks = [mx.zeros((batch, m, G, max_len, cfg.head_dim), self.cdt) for _ in range(cfg.n_layers)]
        self.vs = [mx.zeros((batch, G, max_len, cfg.v_head_dim), self.cdt) for _ in range(cfg.n_layers)]
        self.batch, self.max_len, self.pos = batch, max_len, 0

    def prefill(self, tokens, max_len: int):
        """(B, T) int32 prompt -> (B, T, V) float32 logits; the cache holds positions 0..T-1."""
        cfg, T = self.cfg, tokens.shape[1]
        self.allocate(tokens.shape[0], max_len)
        zero = mx.array([0], mx.int32)

        def attend(w, h, i):  # the training forward's op, causal over the prompt
            q, k, v = _qkv(cfg, w, h, 0)
            self.ks[i] = mx.slice_update(self.ks[i], _cache_layout(cfg, k).astype(self.cdt), zero, axes=(3,))
            self.vs[i] = mx.slice_update(self.vs[i], v.astype(self.cdt), zero, axes=(2,))
            op = self.model.layers[i].attn.op
            q, k, v = q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)  # the ops' (B, T, heads, dim)
            if cfg.attention == "vanilla":
                return op(q, k, v)
            if cfg.attention == "diff":
                return _subln(cfg, i, w, op(q, k, v, w["lam"]))
            return op(q, k, v, _v2_lambda(w, h))

        x = self.weights["embed"][tokens].astype(self.cdt)
        for i, w in enumerate(self.weights["layers"]):
            x = _block(cfg, i, w, x, lambda w, h, i=i: attend(w, h, i))
        self.pos = T
        out = _logits(cfg, self.weights, x)
        mx.eval(out, self.ks, self.vs)
        return out

    def step(self, tokens):
        """(B,) int32 next tokens -> (B, V) float32 logits at the next position."""
        if self.ks is None or self.pos == 0:
            raise RuntimeError("decode step before prefill")
        if self.pos >= self.max_len:
            raise ValueError(f"the cache's {self.max_len} positions are full")
        pos = mx.array([self.pos], mx.int32)
        logits, self.ks, self.vs = self._step(self.weights, self.ks, self.vs, tokens.reshape(-1, 1), pos)
        self.pos += 1
        mx.eval(logits, self.ks, self.vs)
        return logits
