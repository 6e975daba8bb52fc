"""The model of diffattn.spec in MLX: a module tree whose parameter names are the canonical ones.

Parameters are kept in float32 (the master copy); every use
casts them to the compute dtype (`x.dtype`), so a bfloat16 model differentiates straight back
into float32 master weights. Logits, the loss and DIFF V1's lambda stay in the master dtype.
"""
import mlx.core as mx
import mlx.nn as nn

from backends.mlx.ops import IMPLS
from diffattn.config import ModelConfig


class Linear(nn.Module):
    """y = x W^T with W (out, in), no bias."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = mx.zeros((d_out, d_in))

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


def rope(x, theta: float):
    """Interleaved (GPT-J) RoPE on (B, L, heads, d), positions 0..L-1; returns a (B, L, heads, d)
    view of a (B, heads, L, d) array, the layout SDPA and the fused kernel read without a copy."""
    return mx.fast.rope(x.swapaxes(1, 2), x.shape[-1], traditional=True, base=theta, scale=1.0,
                        offset=0).swapaxes(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, impl: str, mix: dict | None = None):
        super().__init__()
        if cfg.attention == "diff" and cfg.diff_heads == "double" and impl == "fused":
            raise ValueError("kernels='fused' implements DIFF V1's split (paper) layout; a diff_heads='double' "
                             "model runs with kernels='composed' or 'naive'")
        # the negative map's weight (spec.py's lambda_mix): {"lambda_mix": array} shared by the model's
        # layers and handed to mx.compile as state, so the compiled step reads the current value; kept
        # out of the parameter tree (object.__setattr__) so it is neither trained nor saved
        object.__setattr__(self, "mix", mix if mix is not None else {"lambda_mix": mx.array(1.0)})
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = Linear(d, cfg.q_heads * hd)
        self.k_proj = Linear(d, cfg.k_heads * hd)
        self.v_proj = Linear(d, cfg.kv_heads * cfg.v_head_dim)
        self.out_proj = Linear(cfg.n_heads * cfg.v_head_dim, d)
        if cfg.attention == "diff":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, mx.zeros((hd,)))
            if cfg.diff_subln:  # eps as the spec's subln: the config's norm_eps
                self.subln = RMSNorm(cfg.v_head_dim, cfg.norm_eps)
        elif cfg.attention == "diff_v2":
            self.lambda_proj = Linear(d, cfg.n_heads)
        self.cfg, self.lambda_init, self.op = cfg, cfg.lambda_init(layer), IMPLS[cfg.attention][impl]

    def lam(self):
        """DIFF V1's lambda, in the master dtype whatever the compute dtype."""
        return (mx.exp(mx.sum(self.lambda_q1 * self.lambda_k1)) - mx.exp(mx.sum(self.lambda_q2 * self.lambda_k2))
                + self.lambda_init)

    def __call__(self, x):
        cfg, (B, L, _) = self.cfg, x.shape
        q = rope(self.q_proj(x).reshape(B, L, cfg.q_heads, cfg.head_dim), cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(B, L, cfg.k_heads, cfg.head_dim), cfg.rope_theta)
        v = self.v_proj(x).reshape(B, L, cfg.kv_heads, cfg.v_head_dim)
        mix = self.mix["lambda_mix"]
        if cfg.attention == "vanilla":
            o = self.op(q, k, v)
        elif cfg.attention == "diff":
            o = self.op(q, k, v, self.lam() * mix)
            if cfg.diff_subln:
                o = self.subln(o) * (1.0 - self.lambda_init)
        else:
            lam = mx.sigmoid(self.lambda_proj(x))
            o = self.op(q, k, v, lam * mix.astype(lam.dtype))
        return self.out_proj(o.reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.w1, self.w3, self.w2 = Linear(d, ffn), Linear(d, ffn), Linear(ffn, d)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, impl: str, mix: dict | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer, impl, mix)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Embedding(nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.weight = mx.zeros((vocab, d))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: str, dtype=mx.float32):
        super().__init__()
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        object.__setattr__(self, "mix", {"lambda_mix": mx.array(1.0)})
        self.layers = [Block(cfg, i, impl, self.mix) for i in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        self.cfg, self.compute_dtype = cfg, dtype

    def __call__(self, tokens):
        """(B, L) int tokens -> (B, L, vocab) float32 logits."""
        x = self.embed.weight[tokens].astype(self.compute_dtype)
        for block in self.layers:
            x = block(x)
        x = self.norm(x)
        head = self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return (x @ head.astype(x.dtype).T).astype(self.embed.weight.dtype)


def token_losses(model, batch):
    """(B, L) next-token cross-entropy in nats of batch (B, L+1)."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def mean_loss(model, batch):
    return mx.mean(token_losses(model, batch))
