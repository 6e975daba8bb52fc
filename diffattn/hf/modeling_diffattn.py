"""A diffattn model (vanilla, DIFF V1, DIFF V2) for transformers, loaded with trust_remote_code=True.

`diffattn export RUN --to hf OUT_DIR` copies this file beside config.json and model.safetensors.
It depends on torch and transformers only, and computes diffattn.spec's model: tensor names are
the suite's canonical ones (diffattn/params.py), RoPE is interleaved (pairs 2i, 2i+1), attention is
materialized (the paper's form; written for evaluation, not speed). config.model_config holds the
suite's ModelConfig fields. forward(input_ids, labels=None) -> CausalLMOutput(loss, logits); no
KV cache and no padding mask (an attention_mask with zeros is refused).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class DiffAttnConfig(PretrainedConfig):
    model_type = "diffattn"

    def __init__(self, model_config: dict | None = None, **kwargs):
        self.model_config = dict(model_config or {})
        kwargs.setdefault("tie_word_embeddings", False)  # the head ties itself (model_config)
        super().__init__(**kwargs)


def _cfg(mc: dict) -> dict:
    """Derived sizes, as diffattn.config.ModelConfig's properties."""
    c = dict(mc)
    att, h, kv = c["attention"], c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
    split = att == "diff" and c.get("diff_heads", "split") == "split"
    hd = c["d_model"] // h // (2 if split else 1)
    c.update(kv_heads=kv, head_dim=hd, q_heads=h if att == "vanilla" else 2 * h,
             k_heads=2 * kv if att == "diff" else kv, v_head_dim=2 * hd if split else hd,
             ffn_dim=c.get("ffn_hidden") or 64 * math.ceil(8 * c["d_model"] / 3 / 64),
             diff_subln=c.get("diff_subln", True))
    return c


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """Interleaved RoPE on (B, heads, L, d): pair (2i, 2i+1) rotated by pos * theta^(-2i/d)."""
    L, d = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = torch.arange(L, dtype=torch.float64, device=x.device)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


def causal_softmax(q, k):
    L = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(mask, float("-inf")).softmax(-1)


class Attention(nn.Module):
    def __init__(self, c: dict, layer: int):
        super().__init__()
        d, hd = c["d_model"], c["head_dim"]
        self.c, self.lambda_init = c, 0.8 - 0.6 * math.exp(-0.3 * layer)
        self.q_proj = nn.Linear(d, c["q_heads"] * hd, bias=False)
        self.k_proj = nn.Linear(d, c["k_heads"] * hd, bias=False)
        self.v_proj = nn.Linear(d, c["kv_heads"] * c["v_head_dim"], bias=False)
        self.out_proj = nn.Linear(c["n_heads"] * c["v_head_dim"], d, bias=False)
        if c["attention"] == "diff":
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, n, nn.Parameter(torch.zeros(hd)))
            if c["diff_subln"]:
                self.subln = nn.Module()
                self.subln.weight = nn.Parameter(torch.ones(c["v_head_dim"]))
        elif c["attention"] == "diff_v2":
            self.lambda_proj = nn.Linear(d, c["n_heads"], bias=False)

    def forward(self, x):
        c, (B, L, _) = self.c, x.shape
        heads = lambda t, n: t.view(B, L, n, -1).transpose(1, 2)  # noqa: E731
        q = rope(heads(self.q_proj(x), c["q_heads"]), c["rope_theta"])
        k = rope(heads(self.k_proj(x), c["k_heads"]), c["rope_theta"])
        v = heads(self.v_proj(x), c["kv_heads"])
        att = c["attention"]
        if att == "vanilla":
            g = c["n_heads"] // c["kv_heads"]
            y = causal_softmax(q, k.repeat_interleave(g, 1)) @ v.repeat_interleave(g, 1)
        elif att == "diff":
            g = c["n_heads"] // c["kv_heads"]
            vr = v.repeat_interleave(g, 1)
            a1 = causal_softmax(q[:, 0::2], k[:, 0::2].repeat_interleave(g, 1)) @ vr
            a2 = causal_softmax(q[:, 1::2], k[:, 1::2].repeat_interleave(g, 1)) @ vr
            lam = (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                   + self.lambda_init)
            y = a1 - lam * a2
            if c["diff_subln"]:
                y = rms_norm(y, self.subln.weight, c["norm_eps"]) * (1.0 - self.lambda_init)
        else:
            g = c["q_heads"] // c["kv_heads"]
            a = causal_softmax(q, k.repeat_interleave(g, 1)) @ v.repeat_interleave(g, 1)
            lam = torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)[..., None]
            y = a[:, 0::2] - lam * a[:, 1::2]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))


class Norm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.attn_norm, self.attn = Norm(c["d_model"], c["norm_eps"]), Attention(c, layer)
        self.mlp_norm, self.mlp = Norm(c["d_model"], c["norm_eps"]), MLP(c["d_model"], c["ffn_dim"])

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, d))


class DiffAttnForCausalLM(PreTrainedModel):
    config_class = DiffAttnConfig
    base_model_prefix = "diffattn"
    main_input_name = "input_ids"

    def __init__(self, config: DiffAttnConfig):
        super().__init__(config)
        c = self.c = _cfg(config.model_config)
        self.embed = Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(Block(c, i) for i in range(c["n_layers"]))
        self.norm = Norm(c["d_model"], c["norm_eps"])
        if not c.get("tie_embeddings", True):
            self.lm_head = nn.Module()
            self.lm_head.weight = nn.Parameter(torch.zeros(c["vocab_size"], c["d_model"]))
        self.post_init()

    def _init_weights(self, module):  # every tensor comes from model.safetensors
        pass

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("diffattn models take unpadded batches: attention_mask must be all ones")
        x = self.embed.weight[input_ids]
        for block in self.layers:
            x = block(x)
        head = self.embed.weight if self.c.get("tie_embeddings", True) else self.lm_head.weight
        logits = self.norm(x) @ head.T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)
