"""AdamW and Muon exactly as diffattn.optim's adamw_step and muon_step, in MLX, and the compiled
training step.

MLX's own optimizers differ from the spec (Adam without bias correction by default, weight
decay on every tensor; its Muon runs Newton-Schulz in the gradient's dtype with other defaults),
so the updates are written out here over {canonical name: array}. Muon's tensors hold no v.
"""
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from backends.mlx.model import mean_loss
from diffattn import optim as optim_spec
from diffattn.config import AdamWConfig, MuonConfig


def flat(tree) -> dict:
    return dict(tree_flatten(tree))


def clip_by_global_norm(grads: dict, clip: float) -> dict:
    if clip <= 0:
        return grads
    norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
    coef = mx.minimum(1.0, clip / (norm + 1e-6))
    return {k: g * coef for k, g in grads.items()}


def newton_schulz(u, cfg: MuonConfig):
    """optim.newton_schulz over the last two axes, in float32 (bf16 with ns_dtype "bfloat16")."""
    a, b, c = cfg.ns_coefficients
    x = u.astype(mx.bfloat16 if cfg.ns_dtype == "bfloat16" else mx.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = mx.swapaxes(x, -1, -2)
    x = x / (mx.sqrt(mx.sum(mx.square(x), axis=(-2, -1), keepdims=True)) + cfg.ns_eps)
    for _ in range(cfg.ns_steps):
        A = x @ mx.swapaxes(x, -1, -2)
        x = a * x + (b * A + c * (A @ A)) @ x
    return mx.swapaxes(x, -1, -2) if tall else x


def muon_update(params: dict, grads: dict, opt: dict, lr, muon: MuonConfig, new: dict) -> None:
    """optim.muon_step's hidden-matrix update of (clipped) grads into new; matrices of one shape
    are orthogonalised together as one batch. opt["m"] updated in place."""
    mu = muon.momentum
    by_shape: dict[tuple, list] = {}
    for k in params:
        by_shape.setdefault(tuple(params[k].shape), []).append(k)
    for shape, keys in by_shape.items():
        us = []
        for k in keys:
            m = mu * opt["m"][k] + (1.0 - mu) * grads[k]
            opt["m"][k] = m
            us.append((1.0 - mu) * grads[k] + mu * m if muon.nesterov else m)
        o = newton_schulz(mx.stack(us), muon).astype(mx.float32)
        scale = optim_spec.muon_scale(shape)
        for i, k in enumerate(keys):
            new[k] = params[k] * (1.0 - lr * muon.weight_decay) - lr * scale * o[i]


def update(params: dict, grads: dict, opt: dict, lr, cfg: AdamWConfig, muon: MuonConfig | None = None) -> dict:
    """optim.update's step of float32 params: AdamW, or with muon Muon for the tensors of
    optim.is_muon (they have no v) and AdamW for the rest. opt = {"step": scalar array, "m": {...},
    "v": {...}}, updated in place (so mx.compile sees the same containers). Returns the new params."""
    grads = clip_by_global_norm(grads, cfg.grad_clip)
    t = opt["step"] + 1
    bc1 = 1.0 - mx.power(mx.array(cfg.beta1, t.dtype), t)
    bc2 = 1.0 - mx.power(mx.array(cfg.beta2, t.dtype), t)
    new = {}
    hidden = {k: p for k, p in params.items() if muon is not None and optim_spec.is_muon(k, p)}
    if hidden:
        muon_update(hidden, grads, opt, lr, muon, new)
    for k, p in params.items():
        if k in hidden:
            continue
        g = grads[k]
        m = cfg.beta1 * opt["m"][k] + (1.0 - cfg.beta1) * g
        v = cfg.beta2 * opt["v"][k] + (1.0 - cfg.beta2) * mx.square(g)
        if p.ndim >= 2:  # decoupled decay on matrices only, as optim.decays
            p = p * (1.0 - lr * cfg.weight_decay)
        new[k] = p - lr * (m / bc1) / (mx.sqrt(v / bc2) + cfg.eps)
        opt["m"][k], opt["v"][k] = m, v
    opt["step"] = t
    return new


def init_opt(params: dict, muon: bool = False) -> dict:
    return {"step": mx.array(0.0, mx.float32),
            "m": {k: mx.zeros_like(v) for k, v in params.items()},
            "v": {k: mx.zeros_like(v) for k, v in params.items() if not (muon and optim_spec.is_muon(k, v))}}


def make_train_step(model, opt: dict, cfg: AdamWConfig, compile: bool = True, reduce=None,
                    muon: MuonConfig | None = None):
    """step(batch (n_micro, B, L+1) int32, lr float32 scalar) -> pre-update mean loss.
    Gradients are averaged over micro-batches, then one AdamW (or, with muon, Muon + AdamW)
    update. The model's parameters and `opt` are the compiled function's state (read and written
    in place). reduce: None, or (loss, grads) -> (loss, grads) applied before the update (data
    parallel: averaged over the processes, backends/mlx/parallel.py), so Muon orthogonalises the
    global batch's gradient, the same matrix on every rank."""
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
        if reduce is not None:
            loss, grads = reduce(loss, grads)
        new = update(flat(model.trainable_parameters()), grads, opt, lr, cfg, muon)
        model.update(tree_unflatten(list(new.items())))
        return loss

    if not compile:
        return step
    state = [model.state, opt, model.mix]  # model.mix: the DIFF lambda_mix (model.py), read per call
    return partial(mx.compile, inputs=state, outputs=state)(step)
