"""The optimizer specification (numpy AdamW) and the learning-rate schedule.

Every backend implements exactly `adamw_step`; tests check them step by step against it.

    g      <- g * min(1, clip / (||g||_2 + 1e-6))     global norm over all tensors (clip > 0)
    t      <- t + 1
    m      <- b1 m + (1 - b1) g
    v      <- b2 v + (1 - b2) g^2
    p      <- p * (1 - lr wd)                          decoupled decay, matrices (ndim >= 2) only
    p      <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The clip coefficient is torch.nn.utils.clip_grad_norm_'s, and the update is torch.optim.AdamW's
with bias correction (MLX's Adam defaults to none: its backend must turn it on).
"""
from __future__ import annotations

import math

import numpy as np

from diffattn.config import AdamWConfig, TrainConfig


def init_state(params: dict[str, np.ndarray]) -> dict:
    return {"step": 0,
            "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}}


def copy_state(state: dict) -> dict:
    return {"step": int(state["step"]),
            "m": {k: np.array(v) for k, v in state["m"].items()},
            "v": {k: np.array(v) for k, v in state["v"].items()}}


def global_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def decays(name: str, p: np.ndarray) -> bool:
    """Weight decay applies to matrices only (embeddings, projections), never to norms or lambdas."""
    return p.ndim >= 2


def adamw_step(params, grads, state, lr: float, cfg: AdamWConfig = AdamWConfig()):
    """One update; returns (new params, new state). Inputs are not modified."""
    if cfg.grad_clip > 0:
        coef = min(1.0, cfg.grad_clip / (global_norm(grads) + 1e-6))
        grads = {k: g * coef for k, g in grads.items()}
    t = state["step"] + 1
    bc1, bc2 = 1.0 - cfg.beta1 ** t, 1.0 - cfg.beta2 ** t
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = cfg.beta1 * state["m"][k] + (1.0 - cfg.beta1) * g
        v = cfg.beta2 * state["v"][k] + (1.0 - cfg.beta2) * g * g
        if decays(k, p):
            p = p * (1.0 - lr * cfg.weight_decay)
        new_p[k] = p - lr * (m / bc1) / (np.sqrt(v / bc2) + cfg.eps)
        new_m[k], new_v[k] = m, v
    return new_p, {"step": t, "m": new_m, "v": new_v}


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
