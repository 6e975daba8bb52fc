"""The Differential Transformer as a PyTorch nn.Module, built from a ModelConfig.

Its state_dict keys are the canonical parameter names of diffattn.params (embed.weight,
layers.{i}.attn.q_proj.weight, layers.{i}.attn.lambda_q1, ...), so numpy parameters load
without a mapping table. The math is diffattn.spec's; attention itself is delegated to
backends.cuda.ops (naive / composed / fused), which take (B, L, heads, dim) tensors
already rotated by RoPE.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.cuda import ops
from backends.cuda.ops.norm import rms_norm
from diffattn.config import ModelConfig
from diffattn.params import attention_shapes, param_shapes

class Rotary(nn.Module):
    """RoPE over heads of `dim` whose coordinates come in half-split order: the spec's interleaved
    pair (2j, 2j+1) sits at (j, j + dim/2) and is rotated by pos * theta^(-2j/dim).

    Attention only takes dot products of q with k, which a permutation of the coordinates applied
    to both leaves unchanged; so Attention permutes the rows of q_proj and k_proj per head (at
    use, the stored weights stay canonical) and rotates contiguous halves, which GPUs read with
    wide loads, instead of interleaved pairs. Tables: float64, non-persistent buffers."""

    def __init__(self, dim: int, theta: float, length: int):
        super().__init__()
        self.dim, self.theta = dim, theta
        self._build(length)

    @staticmethod
    def half_split(heads: int, dim: int) -> torch.Tensor:
        """Row order taking each head's interleaved coordinates (0, 1, 2, ...) to (0, 2, ..., 1, 3, ...)."""
        order = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
        return (torch.arange(heads)[:, None] * dim + order).flatten()

    def _build(self, length: int, device=None):
        inv_freq = self.theta ** (-np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)
        angle = np.tile(np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :], 2)
        sign = np.repeat([-1.0, 1.0], self.dim // 2)  # out[j] = x[j] cos - x[j+h] sin, out[j+h] = x[j+h] cos + x[j] sin
        self.register_buffer("cos", torch.from_numpy(np.cos(angle)).to(device), persistent=False)
        self.register_buffer("sin", torch.from_numpy(np.sin(angle) * sign).to(device), persistent=False)

    def tables(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (>= L, dim/2) views: the angles of coordinates j < dim/2, sin unsigned."""
        if L > self.cos.shape[0]:
            self._build(L, self.cos.device)
        return self.cos[:, :self.dim // 2], self.sin[:, self.dim // 2:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, heads, dim) in half-split order -> same shape; the position of x[:, t] is t."""
        L = x.shape[1]
        if L > self.cos.shape[0]:
            self._build(L, self.cos.device)
        swapped = x.roll(self.dim // 2, dims=-1)  # the halves exchanged
        return x * self.cos[:L, None, :].to(x.dtype) + swapped * self.sin[:L, None, :].to(x.dtype)


class Attention(nn.Module):
    """One attention layer of any variant; parameter names as in params.attention_shapes."""

    def __init__(self, cfg: ModelConfig, layer: int, kernels: str, kernel_options=None):
        super().__init__()
        self.cfg, self.layer, self.kernels = cfg, layer, kernels
        self.kernel_options = kernel_options  # the fused kernels' KernelOptions (None: the defaults)
        shapes = attention_shapes(cfg)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out_f, in_f = shapes[name + ".weight"]
            setattr(self, name, nn.Linear(in_f, out_f, bias=False))
        if cfg.attention == "diff" and cfg.diff_heads == "double" and kernels == "fused":
            raise ValueError("kernels='fused' implements DIFF V1's split (paper) layout; a diff_heads='double' "
                             "model runs with kernels='composed' or 'naive'")
        # the negative map's weight (spec.py's lambda_mix), set by CudaModel.set_lambda_mix: a buffer,
        # so a compiled or graph-replayed step reads the current value
        self.register_buffer("lambda_mix", torch.ones((), dtype=torch.float64), persistent=False)
        if cfg.attention == "diff":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.zeros(shapes[name])))
            if cfg.diff_subln:  # eps as the spec's subln: the config's norm_eps
                self.subln = RMSNorm(cfg.v_head_dim, cfg.norm_eps)
            # a buffer, not a Python float: torch.compile then reuses one graph for every layer
            self.register_buffer("lambda_init", torch.tensor(cfg.lambda_init(layer), dtype=torch.float64),
                                 persistent=False)
        elif cfg.attention == "diff_v2":
            self.lambda_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len)
        qk_rows = torch.cat([Rotary.half_split(cfg.q_heads, cfg.head_dim),
                             cfg.q_heads * cfg.head_dim + Rotary.half_split(cfg.k_heads, cfg.head_dim)])
        self.register_buffer("qk_rows", qk_rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, (B, L, _) = self.cfg, x.shape
        d = cfg.head_dim
        # one matmul for q, k, v: the weights concatenated (q and k rows in Rotary's half-split
        # order), the output split. V2's lambda_proj stays apart: its n_heads columns would make
        # the row stride of the v view a non-multiple of 8, which CUDA's flash SDPA misreads.
        qk = torch.cat([self.q_proj.weight, self.k_proj.weight])[self.qk_rows]
        qkv = F.linear(x, torch.cat([qk, self.v_proj.weight]))
        if self.kernels == "fused":  # one op: heads split, q and k rotated (its backward writes d qkv whole)
            q, k, v = ops.split_heads(qkv, *self.rotary.tables(L), cfg.q_heads, cfg.k_heads, cfg.kv_heads, d)
        else:
            outs = qkv.split([p.out_features for p in (self.q_proj, self.k_proj, self.v_proj)], -1)
            q = self.rotary(outs[0].view(B, L, cfg.q_heads, d))
            k = self.rotary(outs[1].view(B, L, cfg.k_heads, d))
            v = outs[2].view(B, L, cfg.kv_heads, cfg.v_head_dim)
        if cfg.attention == "vanilla":
            o = ops.vanilla_attention(q, k, v, self.kernels)
        elif cfg.attention == "diff":
            # subln(o) * (1 - lambda_init), the scale folded into the norm's weight, done by the op
            # (the fused kernels normalize in their epilogue)
            norm = None
            if cfg.diff_subln:
                norm = ((self.subln.weight * (1.0 - self.lambda_init)).to(self.subln.weight.dtype), self.subln.eps)
            lam = self.lam()
            o = ops.diff_v1_attention(q, k, v, lam * self.lambda_mix.to(lam.dtype), self.kernels, norm=norm,
                                      options=self.kernel_options)
        else:
            lam = torch.sigmoid(self.lambda_proj(x))  # (B, L, H), token-wise
            lam = lam * self.lambda_mix.to(lam.dtype)
            o = ops.diff_v2_attention(q, k, v, lam, self.kernels, options=self.kernel_options)
        return self.out_proj(o.reshape(B, L, cfg.n_heads * cfg.v_head_dim))

    def lam(self) -> torch.Tensor:
        """DIFF V1's scalar lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, in float32 or wider."""
        dt = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        q1, k1, q2, k2 = (p.to(dt) for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 h) * w3 h)."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, h):
        gate, up = F.linear(h, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, -1)  # one matmul
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, kernels: str, kernel_options=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer, kernels, kernel_options)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Pre-norm decoder. forward(tokens) -> logits; forward(tokens, targets) -> per-token losses
    (reduction='none') or their mean (reduction='mean'), cross-entropy in nats computed in float32."""

    def __init__(self, cfg: ModelConfig, kernels: str = "composed", kernel_options=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, kernels, kernel_options) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        h = self.norm(x)
        head = self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = F.linear(h, head)
        if targets is None:
            return logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return losses if reduction == "mean" else losses.view(targets.shape)


def check_names(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """The module's parameters are exactly the canonical tensors (a wiring guard, raised at build)."""
    got = {n: tuple(p.shape) for n, p in module.named_parameters()}
    if got != shapes:
        raise AssertionError(f"module parameters differ from the canonical names: "
                             f"{sorted(set(got.items()) ^ set(shapes.items()))[:4]}")


def build_transformer(cfg: ModelConfig, kernels: str, kernel_options=None) -> Transformer:
    module = Transformer(cfg, kernels, kernel_options)
    check_names(module, param_shapes(cfg))
    return module


def build_attention(cfg: ModelConfig, layer: int, kernels: str, kernel_options=None) -> Attention:
    module = Attention(cfg, layer, kernels, kernel_options)
    check_names(module, attention_shapes(cfg))
    return module


@torch.no_grad()
def load_numpy(module: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Copy numpy tensors into the module's parameters by canonical name (dtype and device kept)."""
    for name, p in module.named_parameters():
        p.copy_(torch.from_numpy(np.ascontiguousarray(params[name])).to(p.dtype))


__all__ = ["Transformer", "Attention", "build_transformer", "build_attention", "load_numpy", "rms_norm"]
