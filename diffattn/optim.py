"""The optimizer specification (numpy AdamW and Muon) and the learning-rate schedule.

Every backend implements exactly `adamw_step` and `muon_step`; tests check them step by step
against them. AdamW (TrainConfig.optimizer "adamw", every tensor):

    g      <- g * min(1, clip / (||g||_2 + 1e-6))     global norm over all tensors (clip > 0)
    t      <- t + 1
    m      <- b1 m + (1 - b1) g
    v      <- b2 v + (1 - b2) g^2
    p      <- p * (1 - lr wd)                          decoupled decay, matrices (ndim >= 2) only
    p      <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The clip coefficient is torch.nn.utils.clip_grad_norm_'s, and the update is torch.optim.AdamW's
with bias correction (MLX's Adam defaults to none: its backend must turn it on).

Muon (TrainConfig.optimizer "muon"): after the same global clip, the hidden matrices (`is_muon`:
every 2-D tensor of a layer, i.e. attention q/k/v/out and the MLP's w1/w2/w3) take, with
mu = MuonConfig.momentum,

    m      <- mu m + (1 - mu) g                        momentum as an average (m has g's scale)
    u      <- (1 - mu) g + mu m                        Nesterov (nesterov=False: u = m)
    O      <- NS(u)                                    Newton-Schulz: ~ U V^T of u = U S V^T
    p      <- p * (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * O

and every other tensor the AdamW update above (same lr, same step count t). NS(u), five steps of
the quintic X <- a X + (b A + c A^2) X, A = X X^T, on X0 = u / (||u||_F + eps) (transposed first
when rows > cols, so A is the smaller Gram matrix), with Keller Jordan's (a, b, c) = (3.4445,
-4.7750, 2.0315): the coefficients maximise the slope at zero (a = 3.4445), so five steps bring
normalised singular values from ~3e-3 up into [0.68, 1.21] ([0.68, 1.14] from 1e-2) instead
of converging to exactly 1; the cheaper, rougher orthogonaliser is what Muon is tuned with. The
Frobenius normalisation bounds the spectral norm by 1, inside the polynomial's basin. Precision:
float32 by default (or the model's float64 in the reference checks); ns_dtype "bfloat16" rounds
X, A and the products to bf16 as Keller Jordan's GPU code runs it, which the autoresearch MLX
port found diverging on large matrices.

Scale 0.2 sqrt(max(rows, cols)) (Moonshot's "Muon is Scalable for LLM Training"): an orthogonal
rows x cols update has RMS 1/sqrt(max(rows, cols)), so the scaled update has RMS ~0.2, the RMS of a
typical AdamW update; Muon and AdamW tensors then share one learning rate schedule
(TrainConfig.lr) and the decoupled weight decay, where Keller Jordan's sqrt(max(1, rows/cols))
needs a separate, ~10x larger Muon learning rate.

AdamW keeps the embedding (its rows are looked up, not multiplied: an orthogonalised update
would move rare tokens' rows as far as frequent ones'), the LM head, norms, and DIFF's lambda
parameters (V1's four vectors and V2's lambda_proj matrix): lambda sets one mixing weight per head
(and V2's per token), not a hidden-to-hidden map, and NS discards the gradient's scale, so a
head whose lambda gradient is ~0 would still move a full step; AdamW's per-coordinate update
keeps lambda near lambda_init until its gradient says otherwise. Muon keeps one buffer (m); the
state's v of a Muon tensor stays zero, so both optimizers share optim.init_state's layout.
"""
from __future__ import annotations

import math

import numpy as np

from diffattn.config import AdamWConfig, MuonConfig, TrainConfig


def init_state(params: dict[str, np.ndarray], optimizer: str = "adamw") -> dict:
    return {"optimizer": optimizer, "step": 0,
            "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}}


def copy_state(state: dict) -> dict:
    return {"optimizer": state.get("optimizer", "adamw"), "step": int(state["step"]),
            "m": {k: np.array(v) for k, v in state["m"].items()},
            "v": {k: np.array(v) for k, v in state["v"].items()}}


def global_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def decays(name: str, p: np.ndarray) -> bool:
    """Weight decay applies to matrices only (embeddings, projections), never to norms or lambdas."""
    return p.ndim >= 2


def is_muon(name: str, p) -> bool:
    """The tensors Muon updates when optimizer="muon": the layers' 2-D hidden matrices, not the
    embedding, the LM head or DIFF V2's lambda_proj (see the module docstring)."""
    return len(p.shape) == 2 and name.startswith("layers.") and not name.endswith("lambda_proj.weight")


def build_options(tcfg: TrainConfig) -> dict:
    """Backend.build's optimizer arguments for a run: optim=AdamWConfig, and muon=MuonConfig for
    a Muon run only (an AdamW run calls build as before Muon existed)."""
    return {"optim": tcfg.optim, **({"muon": tcfg.muon} if tcfg.optimizer == "muon" else {})}


def _clip(grads, cfg: AdamWConfig):
    if cfg.grad_clip <= 0:
        return grads
    coef = min(1.0, cfg.grad_clip / (global_norm(grads) + 1e-6))
    return {k: g * coef for k, g in grads.items()}


def _adamw(k, p, g, m, v, lr, t, cfg: AdamWConfig):
    m = cfg.beta1 * m + (1.0 - cfg.beta1) * g
    v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g
    if decays(k, p):
        p = p * (1.0 - lr * cfg.weight_decay)
    return p - lr * (m / (1.0 - cfg.beta1 ** t)) / (np.sqrt(v / (1.0 - cfg.beta2 ** t)) + cfg.eps), m, v


def adamw_step(params, grads, state, lr: float, cfg: AdamWConfig = AdamWConfig()):
    """One update; returns (new params, new state). Inputs are not modified."""
    grads = _clip(grads, cfg)
    t = state["step"] + 1
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        new_p[k], new_m[k], new_v[k] = _adamw(k, p, grads[k], state["m"][k], state["v"][k], lr, t, cfg)
    return new_p, {"optimizer": "adamw", "step": t, "m": new_m, "v": new_v}


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), held as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def newton_schulz(g: np.ndarray, cfg: MuonConfig = MuonConfig(), dtype=np.float32) -> np.ndarray:
    """NS(g) of the module docstring over the last two axes, computed in `dtype` (float32 or
    float64); ns_dtype "bfloat16" rounds every intermediate to bf16 (products accumulate in dtype)."""
    a, b, c = cfg.ns_coefficients
    r = round_bf16 if cfg.ns_dtype == "bfloat16" else (lambda t: t)
    x = np.asarray(g, dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    x = r(x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + cfg.ns_eps))
    for _ in range(cfg.ns_steps):
        A = r(x @ np.swapaxes(x, -1, -2))
        B = r(b * A + c * r(A @ A))
        x = r(a * x + r(B @ x))
    return np.swapaxes(x, -1, -2) if tall else x


def muon_scale(shape) -> float:
    """The update's multiplier: RMS ~0.2, as AdamW's (module docstring)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def muon_step(params, grads, state, lr: float, muon: MuonConfig = MuonConfig(), cfg: AdamWConfig = AdamWConfig()):
    """One Muon update of the hidden matrices, AdamW (cfg) of the rest; returns (new params, new
    state). Inputs are not modified."""
    grads = _clip(grads, cfg)
    t = state["step"] + 1
    mu = muon.momentum
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        if not is_muon(k, p):
            new_p[k], new_m[k], new_v[k] = _adamw(k, p, g, m, v, lr, t, cfg)
            continue
        m = mu * m + (1.0 - mu) * g
        u = (1.0 - mu) * g + mu * m if muon.nesterov else m
        o = newton_schulz(u, muon, np.float64 if p.dtype == np.float64 else np.float32).astype(p.dtype)
        new_p[k] = p * (1.0 - lr * muon.weight_decay) - lr * muon_scale(p.shape) * o
        new_m[k], new_v[k] = m, v
    return new_p, {"optimizer": "muon", "step": t, "m": new_m, "v": new_v}


def update(params, grads, state, lr: float, cfg: AdamWConfig, muon: MuonConfig | None = None):
    """The run's update: muon_step when a MuonConfig is given, else adamw_step."""
    if muon is None:
        return adamw_step(params, grads, state, lr, cfg)
    return muon_step(params, grads, state, lr, muon, cfg)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then decay to lr * min_lr_ratio: cosine
    (cfg.schedule "cosine") or a straight line ("linear").

    The decay follows `progress` in [0, 1] when given (a wall-clock budget's fraction used),
    else the fraction of the steps after warmup, reaching the floor at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
