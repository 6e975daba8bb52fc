"""AdamW exactly as diffattn.optim.adamw_step, in MLX, and the compiled training step.

MLX's own optimizers differ from the spec (Adam without bias correction by default, weight
decay on every tensor), so the update is written out here over {canonical name: array}.
"""
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from backends.mlx.model import mean_loss
from diffattn.config import AdamWConfig


def flat(tree) -> dict:
    return dict(tree_flatten(tree))


def clip_by_global_norm(grads: dict, clip: float) -> dict:
    if clip <= 0:
        return grads
    norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
    coef = mx.minimum(1.0, clip / (norm + 1e-6))
    return {k: g * coef for k, g in grads.items()}


def adamw_update(params: dict, grads: dict, opt: dict, lr, cfg: AdamWConfig) -> dict:
    """One spec update of float32 params; opt = {"step": scalar array, "m": {...}, "v": {...}},
    updated in place (so mx.compile sees the same containers). Returns the new params."""
    grads = clip_by_global_norm(grads, cfg.grad_clip)
    t = opt["step"] + 1
    bc1 = 1.0 - mx.power(mx.array(cfg.beta1, t.dtype), t)
    bc2 = 1.0 - mx.power(mx.array(cfg.beta2, t.dtype), t)
    new = {}
    for k, p in params.items():
        g = grads[k]
        m = cfg.beta1 * opt["m"][k] + (1.0 - cfg.beta1) * g
        v = cfg.beta2 * opt["v"][k] + (1.0 - cfg.beta2) * mx.square(g)
        if p.ndim >= 2:  # decoupled decay on matrices only, as optim.decays
            p = p * (1.0 - lr * cfg.weight_decay)
        new[k] = p - lr * (m / bc1) / (mx.sqrt(v / bc2) + cfg.eps)
        opt["m"][k], opt["v"][k] = m, v
    opt["step"] = t
    return new


def init_opt(params: dict) -> dict:
    return {"step": mx.array(0.0, mx.float32),
            "m": {k: mx.zeros_like(v) for k, v in params.items()},
            "v": {k: mx.zeros_like(v) for k, v in params.items()}}


def make_train_step(model, opt: dict, cfg: AdamWConfig, compile: bool = True):
    """step(batch (n_micro, B, L+1) int32, lr float32 scalar) -> pre-update mean loss.
    Gradients are averaged over micro-batches, then one AdamW update. The model's parameters
    and `opt` are the compiled function's state (read and written in place)."""
    loss_and_grad = nn.value_and_grad(model, mean_loss)

    def step(batch, lr):
        loss, grads = 0.0, None
        n = batch.shape[0]
        for i in range(n):
            l, g = loss_and_grad(model, batch[i])
            g = flat(g)
            loss = loss + l / n
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        grads = {k: g / n for k, g in grads.items()}
        new = adamw_update(flat(model.trainable_parameters()), grads, opt, lr, cfg)
        model.update(tree_unflatten(list(new.items())))
        return loss

    if not compile:
        return step
    state = [model.state, opt]
    return partial(mx.compile, inputs=state, outputs=state)(step)
