"""Decoding with a static key/value cache on the PyTorch backend: prefill, then a step per token.

The math is diffattn/decode.py's. A Decoder packs the Transformer's weights once for decoding
(q/k/v rows concatenated in Rotary's half-split order, w1/w3 concatenated, matrices in the
compute dtype: bfloat16 reads half the bytes per token) and preallocates per layer

    k (B, m, G, max_len, head_dim)   m = 2 for DIFF V1 (k1 and k2 of each kv head), else 1
    v (B, G, max_len, v_head_dim)

so DIFF caches each key once and its two maps read k[:, 0] and k[:, 1] in place, and GQA query
heads share their kv head by folding the group into the query rows of one SDPA call (no
repeated keys). As in the bfloat16 training forward (autocast), the residual stream, norms and
logits stay float32; matmuls take their inputs in the compute dtype.

prefill(tokens (B, T)) runs the prompt through the model's own attention op (kernels naive /
composed / fused, causal over the prompt) and writes its keys and values. step(tokens (B,))
attends one query per row to the whole static cache under a mask of the written positions, so
its shapes never change: with compile=True each layer's step is torch.compile'd (one graph for
every layer: weights and cache are its arguments), with graphs=True (CUDA) the whole step is
recorded once as a CUDA graph and replayed, reading its token and position from buffers the
graph owns.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffattn import decode as spec_decode
from backends.cuda import ops
from backends.cuda.model import Transformer
from backends.cuda.ops.norm import rms_norm
from diffattn.config import ModelConfig

WARMUP = 3  # eager (compiled) steps before a CUDA graph is recorded; each rewrites the same entry


def rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary's rotation (half-split coordinates) of x (B, T, heads, dim) at positions (T,)."""
    c, s = cos[positions][None, :, None, :], sin[positions][None, :, None, :]
    return x * c + x.roll(x.shape[-1] // 2, dims=-1) * s


def attend_cache(q, k, v, mask, scale):
    """q (B, T, Hq, d) over the cache k (B, G, S, d), v (B, G, S, dv); query head h reads kv head
    h // (Hq/G). The group's r query heads become r*T query rows of one SDPA call per kv head,
    so no key is repeated. mask (T, S) bool: True where a key may be read. -> (B, T, Hq, dv)."""
    B, T, Hq, d = q.shape
    G, S, dv = k.shape[1], k.shape[2], v.shape[-1]
    r = Hq // G
    qg = q.unflatten(2, (G, r)).permute(0, 2, 3, 1, 4).reshape(B, G, r * T, d)
    m = mask[None].expand(r, T, S).reshape(1, 1, r * T, S)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=scale)
    return o.view(B, G, r, T, dv).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, dv)


class LayerPack:
    """One block's weights as decoding reads them, and as the compiled layer step takes them:
    `tensors`, in a fixed order per variant."""

    def __init__(self, block, cfg: ModelConfig, cdt: torch.dtype):
        a = block.attn
        qk = torch.cat([a.q_proj.weight, a.k_proj.weight])[a.qk_rows]
        self.splits = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
        self.tensors = [block.attn_norm.weight, torch.cat([qk, a.v_proj.weight]).to(cdt), a.out_proj.weight.to(cdt),
                        block.mlp_norm.weight, torch.cat([block.mlp.w1.weight, block.mlp.w3.weight]).to(cdt),
                        block.mlp.w2.weight.to(cdt)]
        if cfg.attention == "diff":  # lambda and subln's weight with (1 - lambda_init) folded in
            self.tensors += [a.lam(), (a.subln.weight * (1.0 - a.lambda_init)).to(a.subln.weight.dtype)]
            self.subln_eps = a.subln.eps
        elif cfg.attention == "diff_v2":
            self.tensors += [a.lambda_proj.weight.to(cdt)]


class Decoder:
    """Prefill and decode steps of one Transformer over a cache this object owns."""

    def __init__(self, module: Transformer, cdt: torch.dtype, kernels: str, compile: bool = False,
                 graphs: bool = False):
        cfg = self.cfg = module.cfg
        self.cdt, self.kernels, self.graphs = cdt, kernels, graphs
        # the fused kernels' KernelOptions the model was built with: prefill runs the model's op
        self.kernel_options = module.layers[0].attn.kernel_options
        with torch.no_grad():
            self.layers = [LayerPack(b, cfg, cdt) for b in module.layers]
            self.embed = module.embed.weight  # the lookup reads B rows of the master copy
            self.head = (module.embed.weight if cfg.tie_embeddings else module.lm_head.weight).to(cdt)
            self.norm = module.norm.weight
            rot = module.layers[0].attn.rotary
            rot.tables(cfg.max_seq_len)
            self.cos, self.sin = rot.cos.to(cdt), rot.sin.to(cdt)
        self.splits = self.layers[0].splits
        self.subln_eps = getattr(self.layers[0], "subln_eps", None)
        self.device = self.embed.device
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.k = self.v = None
        self.batch = self.max_len = self.pos = 0
        # one compiled graph for every layer (same shapes, weights and cache passed in)
        self._layer = torch.compile(self._layer_step, dynamic=False) if compile else self._layer_step
        self.graph = None

    # ---- the cache ---------------------------------------------------------------------------
    def allocate(self, batch: int, max_len: int) -> None:
        """Preallocate (or keep, when the size is unchanged) the cache; positions start at 0."""
        cfg = self.cfg
        if (batch, max_len) != (self.batch, self.max_len):
            m, G = cfg.k_heads // cfg.kv_heads, cfg.kv_heads
            kw = dict(dtype=self.cdt, device=self.device)
            self.k = [torch.zeros(batch, m, G, max_len, cfg.head_dim, **kw) for _ in range(cfg.n_layers)]
            self.v = [torch.zeros(batch, G, max_len, cfg.v_head_dim, **kw) for _ in range(cfg.n_layers)]
            self.batch, self.max_len, self.graph = batch, max_len, None
            self.positions = torch.zeros(1, dtype=torch.long, device=self.device)
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = 0

    def bytes_per_token(self) -> int:
        """Cache bytes one position of one row holds (diffattn.decode.cache_bytes_per_token)."""
        return spec_decode.cache_elements_per_token(self.cfg) * self.k[0].element_size()

    # ---- pieces shared by prefill and the step -------------------------------------------------
    def _qkv(self, h, w_qkv, positions):
        cfg, (B, T, _) = self.cfg, h.shape
        q, k, v = F.linear(h.to(self.cdt), w_qkv).split(self.splits, -1)
        q = rope_at(q.reshape(B, T, cfg.q_heads, cfg.head_dim), self.cos, self.sin, positions)
        k = rope_at(k.reshape(B, T, cfg.k_heads, cfg.head_dim), self.cos, self.sin, positions)
        return q, k, v.reshape(B, T, cfg.kv_heads, cfg.v_head_dim)

    def _store(self, ck, cv, k, v, positions) -> None:
        """k (B, T, m*G, d) -> ck[:, j, g] = k[:, :, g*m + j]; v (B, T, G, dv) -> cv."""
        ck[:, :, :, positions] = k.unflatten(2, (self.cfg.kv_heads, -1)).permute(0, 3, 2, 1, 4).to(self.cdt)
        cv[:, :, positions] = v.transpose(1, 2).to(self.cdt)

    def _v2_lambda(self, h, w_lam):
        return torch.sigmoid(F.linear(h.to(self.cdt), w_lam))  # (B, T, H), token-wise

    def _residual(self, x, o, w_o, mlp_norm, w13, w2):
        """x + out_proj(o), then + mlp: o (B, T, n_heads, v_head_dim)."""
        x = x + F.linear(o.flatten(2).to(self.cdt), w_o)
        gate, up = F.linear(rms_norm(x, mlp_norm, self.cfg.norm_eps).to(self.cdt), w13).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, w2)

    def _embed(self, tokens):
        return self.embed[tokens].to(torch.promote_types(self.embed.dtype, torch.float32))

    def _logits(self, x):
        out = F.linear(rms_norm(x, self.norm, self.cfg.norm_eps).to(self.cdt), self.head)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, T) prompt -> (B, T, V) float32 logits; the cache holds positions 0..T-1 after."""
        self.allocate(tokens.shape[0], max_len)
        positions = torch.arange(tokens.shape[1], device=self.device)
        att = self.cfg.attention
        x = self._embed(tokens)
        for i, p in enumerate(self.layers):
            attn_norm, w_qkv, w_o, mlp_norm, w13, w2, *extra = p.tensors
            h = rms_norm(x, attn_norm, self.cfg.norm_eps)
            q, k, v = self._qkv(h, w_qkv, positions)
            self._store(self.k[i], self.v[i], k, v, positions)
            # the training forward's attention op, causal over the prompt
            if att == "vanilla":
                o = ops.vanilla_attention(q, k, v, self.kernels)
            elif att == "diff":
                o = ops.diff_v1_attention(q, k, v, extra[0], self.kernels, norm=(extra[1], self.subln_eps),
                                          options=self.kernel_options)
            else:
                o = ops.diff_v2_attention(q, k, v, self._v2_lambda(h, extra[0]), self.kernels,
                                          options=self.kernel_options)
            x = self._residual(x, o, w_o, mlp_norm, w13, w2)
        self.pos = tokens.shape[1]
        return self._logits(x)

    # ---- one decode step -------------------------------------------------------------------------
    def _layer_step(self, x, positions, mask, ck, cv, attn_norm, w_qkv, w_o, mlp_norm, w13, w2, *extra):
        """One block for x (B, 1, D) at positions (1,): writes ck / cv there and attends one query
        per row to the whole static cache, keys past the position masked off (mask (1, S))."""
        att = self.cfg.attention
        h = rms_norm(x, attn_norm, self.cfg.norm_eps)
        q, k, v = self._qkv(h, w_qkv, positions)
        self._store(ck, cv, k, v, positions)
        if att == "vanilla":
            o = attend_cache(q, ck[:, 0], cv, mask, self.scale)
        elif att == "diff":  # sub-heads 2i, 2i+1 of q are head i's q1, q2
            o1 = attend_cache(q[:, :, 0::2], ck[:, 0], cv, mask, self.scale)
            o2 = attend_cache(q[:, :, 1::2], ck[:, 1], cv, mask, self.scale)
            o = rms_norm(o1 - extra[0] * o2, extra[1], self.subln_eps)
        else:
            a = attend_cache(q, ck[:, 0], cv, mask, self.scale)  # (B, 1, 2H, d): pairs 2i, 2i+1
            o = a[:, :, 0::2] - self._v2_lambda(h, extra[0])[..., None] * a[:, :, 1::2]
        return self._residual(x, o, w_o, mlp_norm, w13, w2)

    def _step_math(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at positions (1,) -> (B, V) float32 logits; writes the cache there."""
        mask = torch.arange(self.max_len, device=self.device)[None, :] <= positions[:, None]  # (1, S)
        x = self._embed(tokens)
        for i, p in enumerate(self.layers):
            x = self._layer(x, positions, mask, self.k[i], self.v[i], *p.tensors)
        return self._logits(x)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) next tokens -> (B, V) float32 logits at the next position (a tensor the graph
        owns when graphs=True: read it before the next step)."""
        if self.k is None or self.pos == 0:
            raise RuntimeError("decode step before prefill")
        if self.pos >= self.max_len:
            raise ValueError(f"the cache's {self.max_len} positions are full")
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.fill_(self.pos)
        self.pos += 1
        if not self.graphs:
            return self._step_math(self.tokens, self.positions)
        if self.graph is None:
            return self._record()
        self.graph.replay()
        return self.logits

    def _record(self) -> torch.Tensor:
        """Warm up on a side stream (each run rewrites the same cache entry with the same values),
        record the step, replay it once: the logits of this step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._step_math(self.tokens, self.positions)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_math(self.tokens, self.positions)
        self.graph.replay()
        return self.logits
