"""Convert a vanilla model to differential attention: a mapping of tensors (numpy only).

    new_cfg, new_params = to_diff(cfg, params, to="diff", heads="double", zero_init=True,
                                  mirror_weights=False, sublayer_norm=False, seed=0)

Every tensor outside attention (embedding, norms, MLP, head) is copied unchanged. In attention:

to="diff", heads="double" (--double-heads, the default). DIFF V1 with n_heads DIFF heads in the
  "double" layout (diffattn/config.py): DIFF head h's first map is the vanilla head h (its q rows
  become q head 2h, its kv head g's k rows k head 2g), its V is the vanilla V and out_proj is
  unchanged. The second (negative) map's q/k rows are new: drawn N(0, std of that layer's
  vanilla q / k rows) from `seed`, or with mirror_weights copies of the first map's rows.
to="diff", heads="split" (--split-heads). DIFF V1 in the paper's layout with n_heads/2 DIFF heads
  (n_heads and n_kv_heads even): vanilla heads 2j and 2j+1 become DIFF head j's two maps, their
  V heads DIFF head j's V of twice the width, every projection copied as it is. The vanilla
  heads 2j+1 no longer read their own V, so this never computes the original function.
to="diff_v2". DIFF V2 with n_heads output heads: vanilla q head h becomes q head 2h, the new q
  head 2h+1 is drawn or mirrored as above; k, v and out_proj unchanged; lambda_proj N(0,
  init_std), or zero with zero_init (then lambda_t = sigmoid(0) = 1/2: V2's lambda cannot be 0,
  so V2 never computes the original function; a lambda warmup from 0 starts at it).

lambda (V1). zero_init makes lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init exactly 0 (to
  rounding) with every lambda vector nonzero, so each still gets a gradient: lq1, lk1, lq2 are
  drawn N(0, 0.1), and lk2 = lq2 * ln(exp(lq1.lk1) + lambda_init) / |lq2|^2. Without zero_init
  the lambda vectors are drawn N(0, 0.1) as a fresh DIFF model's (lambda near lambda_init).
sublayer_norm (V1). True: DIFF V1's subln (weight 1) and (1 - lambda_init) scale, as the paper;
  False: no subln (ModelConfig.diff_subln=False), the output is A1 V - lambda A2 V.

So with heads="double", zero_init and no sublayer norm the converted model computes the original
function (A1 V - 0 * A2 V = A1 V, everything else copied); that is tested against the spec.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from diffattn.config import ConfigError, ModelConfig
from diffattn.params import check_params

TARGETS = ("diff", "diff_v2")
HEADS = ("double", "split")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, 2, zlib.crc32(name.encode())])  # tag 2: conversion-only draws


def _interleave_heads(first: np.ndarray, second: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q/k projections: head 2h from first's head h, head 2h+1 from second's head h."""
    d_in = first.shape[1]
    a, b = first.reshape(heads, -1, d_in), second.reshape(heads, -1, d_in)
    return np.stack([a, b], 1).reshape(-1, d_in)


def _negative_rows(w: np.ndarray, mirror: bool, seed: int, name: str) -> np.ndarray:
    if mirror:
        return w.copy()
    return (_rng(seed, name).standard_normal(w.shape) * float(np.std(w))).astype(np.float32)


def zero_lambda(lambda_init: float, dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DIFF V1 lambda vectors, all nonzero, with exp(lq1.lk1) - exp(lq2.lk2) + lambda_init = 0."""
    # drawn at the float32 the checkpoint stores, so only lk2's own rounding is left in lambda
    lq1, lk1, lq2 = (np.float32(0.1) * rng.standard_normal(dim).astype(np.float32) for _ in range(3))
    lq1, lk1, lq2 = (v.astype(np.float64) for v in (lq1, lk1, lq2))
    target = math.log(math.exp(float(lq1 @ lk1)) + lambda_init)  # lq2 . lk2 must equal this
    lk2 = lq2 * target / float(lq2 @ lq2)
    return {k: v.astype(np.float64) for k, v in
            {"lambda_q1": lq1, "lambda_k1": lk1, "lambda_q2": lq2, "lambda_k2": lk2}.items()}


def to_diff(cfg: ModelConfig, params: dict[str, np.ndarray], to: str = "diff", heads: str = "double",
            zero_init: bool = False, mirror_weights: bool = False, sublayer_norm: bool = False,
            seed: int = 0) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(DIFF config, its params) from a vanilla model; see the module doc for the semantics."""
    if cfg.attention != "vanilla":
        raise ConfigError(f"convert: the model is {cfg.attention!r}; only a vanilla model converts")
    if to not in TARGETS:
        raise ConfigError(f"convert: --to {to!r}, expected one of {TARGETS}")
    if heads not in HEADS:
        raise ConfigError(f"convert: heads={heads!r}, expected one of {HEADS}")
    check_params(cfg, params)
    if to == "diff_v2":
        if heads == "split":
            raise ConfigError("convert: --split-heads is a DIFF V1 layout; DIFF V2 doubles the query heads")
        new = dataclasses.replace(cfg, attention="diff_v2")
    elif heads == "double":
        new = dataclasses.replace(cfg, attention="diff", diff_heads="double", diff_subln=bool(sublayer_norm))
    else:
        if cfg.n_heads % 2 or cfg.kv_heads % 2:
            raise ConfigError(f"convert: --split-heads needs even n_heads and n_kv_heads, got {cfg.n_heads} "
                              f"and {cfg.kv_heads}")
        if mirror_weights:
            raise ConfigError("convert: --mirror-weights has nothing to copy with --split-heads (every map comes "
                              "from an original head)")
        kv = cfg.kv_heads // 2
        new = dataclasses.replace(cfg, attention="diff", diff_heads="split", diff_subln=bool(sublayer_norm),
                                  n_heads=cfg.n_heads // 2, n_kv_heads=None if kv == cfg.n_heads // 2 else kv)
    out = {k: v for k, v in params.items() if ".attn." not in k}
    for i in range(cfg.n_layers):
        pre = f"layers.{i}.attn."
        q, k = params[pre + "q_proj.weight"], params[pre + "k_proj.weight"]
        out[pre + "v_proj.weight"] = params[pre + "v_proj.weight"]
        out[pre + "out_proj.weight"] = params[pre + "out_proj.weight"]
        if heads == "split" and to == "diff":
            out[pre + "q_proj.weight"], out[pre + "k_proj.weight"] = q, k
        else:
            out[pre + "q_proj.weight"] = _interleave_heads(
                q, _negative_rows(q, mirror_weights, seed, pre + "q_proj.weight"), cfg.n_heads)
            if to == "diff":
                out[pre + "k_proj.weight"] = _interleave_heads(
                    k, _negative_rows(k, mirror_weights, seed, pre + "k_proj.weight"), cfg.kv_heads)
            else:
                out[pre + "k_proj.weight"] = k
        if to == "diff":
            rng = _rng(seed, pre + "lambda")
            if zero_init:
                lam = zero_lambda(new.lambda_init(i), new.head_dim, rng)
            else:
                lam = {n: rng.standard_normal(new.head_dim) * 0.1
                       for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
            out.update({pre + n: v.astype(np.float32) for n, v in lam.items()})
            if new.diff_subln:
                out[pre + "subln.weight"] = np.ones(new.v_head_dim, np.float32)
        else:
            shape = (cfg.n_heads, cfg.d_model)
            draw = _rng(seed, pre + "lambda_proj.weight").standard_normal(shape) * cfg.init_std
            out[pre + "lambda_proj.weight"] = np.zeros(shape) if zero_init else draw
    from diffattn.params import param_shapes

    out = {n: np.ascontiguousarray(out[n], np.float32) for n in param_shapes(new)}
    check_params(new, out, what="converted model")
    return new, out
