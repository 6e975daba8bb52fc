"""Decoding with a key/value cache, in numpy: the specification both backends' decode paths are
tested against, and the numpy backend's prefill / decode step.

A cache holds, per layer, the rotated keys and the values of every position written so far, in
a buffer preallocated for `max_len` positions (static shapes, as the compiled GPU paths need):

    k (B, k_heads, max_len, head_dim)      v (B, kv_heads, max_len, v_head_dim)

Each variant caches exactly what its attention reads, once, unrepeated (GQA heads are shared by
indexing, never copied):

| attention | keys cached                           | values cached                   |
| --------- | ------------------------------------- | ------------------------------- |
| vanilla   | n_kv_heads of head_dim                | n_kv_heads of head_dim          |
| diff (V1) | 2*n_kv_heads of head_dim: k1 and k2   | n_kv_heads of 2*head_dim, read  |
|           | of each kv head, interleaved          | by both softmax maps            |
| diff_v2   | n_kv_heads of head_dim (both query    | n_kv_heads of head_dim          |
|           | heads of a pair read the same key)    |                                 |

DIFF V2's lambda is a function of the current token's input alone, so it needs no cache; V1's
lambda is a parameter. Twins of one config (ModelConfig.twin) therefore cache the same number of
bytes per token (cache_bytes_per_token): DIFF's two maps cost no extra state.

`forward(cfg, params, tokens, cache)` runs new tokens (B, T) at positions cache.pos .. pos+T-1
through the model, appends their keys and values and returns their logits (B, T, V): prefill
is one call with the prompt, decoding a call per token with T = 1. Every position's logits equal
spec.model_logits of the whole sequence (tests/test_decode.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diffattn import spec
from diffattn.config import ModelConfig

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def cache_elements_per_token(cfg: ModelConfig) -> int:
    """Numbers cached per token over all layers: keys and values."""
    return cfg.n_layers * (cfg.k_heads * cfg.head_dim + cfg.kv_heads * cfg.v_head_dim)


def cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes of key/value state one token adds to the cache, in the cache's dtype."""
    return cache_elements_per_token(cfg) * DTYPE_BYTES[dtype]


@dataclass
class Cache:
    """Per-layer key and value buffers for `max_len` positions; positions < pos are written."""
    k: list[np.ndarray]
    v: list[np.ndarray]
    pos: int = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def new_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=np.float64) -> Cache:
    max_len = cfg.max_seq_len if max_len is None else max_len
    check_lengths(cfg, batch, max_len)
    k = [np.zeros((batch, cfg.k_heads, max_len, cfg.head_dim), dtype) for _ in range(cfg.n_layers)]
    v = [np.zeros((batch, cfg.kv_heads, max_len, cfg.v_head_dim), dtype) for _ in range(cfg.n_layers)]
    return Cache(k, v)


def check_lengths(cfg: ModelConfig, batch: int, max_len: int) -> None:
    """A cache's size must be positive and within the model's context (ValueError otherwise)."""
    if not (isinstance(batch, (int, np.integer)) and batch > 0):
        raise ValueError(f"decode batch size {batch!r} must be a positive integer")
    if not (isinstance(max_len, (int, np.integer)) and 0 < max_len <= cfg.max_seq_len):
        raise ValueError(f"cache length {max_len!r} must lie in [1, max_seq_len={cfg.max_seq_len}]")


def check_tokens(cfg: ModelConfig, tokens, batch: int, pos: int, max_len: int) -> np.ndarray:
    """New tokens (B, T) that fit the cache: one-line ValueError naming what is wrong."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer (batch, T>=1), got {tokens.dtype} of shape {tokens.shape}")
    if tokens.shape[0] != batch:
        raise ValueError(f"tokens have batch {tokens.shape[0]}, the cache holds {batch}")
    if pos + tokens.shape[1] > max_len:
        raise ValueError(f"{pos} cached + {tokens.shape[1]} new positions exceed the cache's {max_len}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens


def attend(q, k, v, pos: int, scale: float):
    """q (B, Hq, T, d) at positions pos..pos+T-1 over the cache's first pos+T positions,
    k (B, G, S, d), v (B, G, S, dv) with Hq a multiple of G (query head h reads kv head
    h // (Hq/G)); causal. Returns (B, Hq, T, dv)."""
    B, Hq, T, d = q.shape
    G, S = k.shape[1], pos + T
    qg = q.reshape(B, G, Hq // G, T, d)
    s = qg @ np.swapaxes(k[:, :, None, :S], -1, -2) * scale  # (B, G, r, T, S)
    future = np.arange(S)[None, :] > (pos + np.arange(T))[:, None]
    s = np.where(future, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v[:, :, None, :S]).reshape(B, Hq, T, v.shape[-1])


def attention(cfg: ModelConfig, layer: int, p, x, cache: Cache):
    """One attention layer over new inputs x (B, T, D); writes the layer's cache entries."""
    B, T, _ = x.shape
    hd, att, pos = cfg.head_dim, cfg.attention, cache.pos
    cos, sin = spec.rope_tables(pos + T, hd, cfg.rope_theta, x.dtype)
    cos, sin = cos[pos:], sin[pos:]
    scale = 1.0 / math.sqrt(hd)
    q = spec.apply_rope(spec._heads(x @ p["q_proj.weight"].T, cfg.q_heads), cos, sin)
    k = spec.apply_rope(spec._heads(x @ p["k_proj.weight"].T, cfg.k_heads), cos, sin)
    ck, cv = cache.k[layer], cache.v[layer]
    ck[:, :, pos:pos + T] = k
    cv[:, :, pos:pos + T] = spec._heads(x @ p["v_proj.weight"].T, cfg.kv_heads)
    if att == "vanilla":
        y = attend(q, ck, cv, pos, scale)
    elif att == "diff":
        o1 = attend(q[:, 0::2], ck[:, 0::2], cv, pos, scale)
        o2 = attend(q[:, 1::2], ck[:, 1::2], cv, pos, scale)
        lam = spec.diff_lambda(cfg, layer, p)[0]
        y = spec.rmsnorm(o1 - lam * o2, p["subln.weight"], cfg.norm_eps) * (1.0 - cfg.lambda_init(layer))
    else:  # diff_v2
        a = attend(q, ck, cv, pos, scale)
        lam = spec.sigmoid(x @ p["lambda_proj.weight"].T).transpose(0, 2, 1)[..., None]  # (B, H, T, 1)
        y = a[:, 0::2] - lam * a[:, 1::2]
    return spec._merge(y) @ p["out_proj.weight"].T


def forward(cfg: ModelConfig, params, tokens, cache: Cache, dtype=np.float64):
    """Logits (B, T, V) of new tokens (B, T) at positions cache.pos..; the cache advances by T."""
    tokens = check_tokens(cfg, tokens, cache.batch, cache.pos, cache.max_len)
    params = spec._cast(params, dtype)
    eps = cfg.norm_eps
    x = params["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        x = x + attention(cfg, i, spec._layer(params, i), spec.rmsnorm(x, params[pre + "attn_norm.weight"], eps),
                          cache)
        m = spec.rmsnorm(x, params[pre + "mlp_norm.weight"], eps)
        hidden = spec.silu(m @ params[pre + "mlp.w1.weight"].T) * (m @ params[pre + "mlp.w3.weight"].T)
        x = x + hidden @ params[pre + "mlp.w2.weight"].T
    cache.pos += tokens.shape[1]
    h = spec.rmsnorm(x, params["norm.weight"], eps)
    head = params["embed.weight"] if cfg.tie_embeddings else params["lm_head.weight"]
    return h @ head.T


def bytes_per_step(cfg: ModelConfig, batch: int, context: int, dtype: str = "bfloat16") -> int:
    """Bytes a decode step must read from memory at least: every weight once (the tied head is
    the embedding, read whole; the embedding lookup itself reads B rows, counted in it) and the
    cached keys and values of `context` positions for each of the batch's rows."""
    return (cfg.num_params() + batch * context * cache_elements_per_token(cfg)) * DTYPE_BYTES[dtype]
