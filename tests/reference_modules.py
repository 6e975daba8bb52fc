"""Fixture-format files for shapes the shipped fixture does not cover.

Microsoft's modules cannot run here (they need flash-attn), so these are independent PyTorch
re-statements of the same layers, written in the reference's own formulation (materialized
softmax, [B, heads, L, d] views, torch autograd for every gradient), and sharing no code with
diffattn. Writing a file in the fixture layout lets conformance be exercised on unseen shapes
(GQA/MQA, odd sequence lengths) with gradients that did not come from the hand-written backward.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch


def _rope(x, theta=10000.0):
    # x: (B, L, h, d), interleaved pairs
    L, d = x.shape[1], x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2), cos, sin


def _softmax_attend(q, k, v):
    # q (B, hq, L, d); k, v (B, hk, L, *) with hq a multiple of hk
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _forward(kind, p, x, meta):
    B, L, D = x.shape
    H = meta["num_heads"]
    G = meta.get("num_kv_heads") or H
    if kind == "vanilla":
        d = D // H
        q, _, _ = _rope((x @ p["q_proj.weight"].T).view(B, L, H, d))
        k, _, _ = _rope((x @ p["k_proj.weight"].T).view(B, L, G, d))
        v = (x @ p["v_proj.weight"].T).view(B, L, G, d)
        o = _softmax_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).reshape(B, L, D) @ p["out_proj.weight"].T
    if kind == "diff_v1":
        d = D // H // 2
        q, _, _ = _rope((x @ p["q_proj.weight"].T).view(B, L, 2 * H, d))
        k, _, _ = _rope((x @ p["k_proj.weight"].T).view(B, L, 2 * G, d))
        v = (x @ p["v_proj.weight"].T).view(B, L, G, 2 * d).transpose(1, 2)
        q, k = q.view(B, L, H, 2, d), k.view(B, L, G, 2, d)
        a1 = _softmax_attend(q[:, :, :, 0].transpose(1, 2), k[:, :, :, 0].transpose(1, 2), v)
        a2 = _softmax_attend(q[:, :, :, 1].transpose(1, 2), k[:, :, :, 1].transpose(1, 2), v)
        li = meta["lambda_init"]
        lam = (torch.exp((p["lambda_q1"] * p["lambda_k1"]).sum()) - torch.exp((p["lambda_q2"] * p["lambda_k2"]).sum()) + li)
        o = a1 - lam * a2
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * p["subln.weight"] * (1 - li)
        return o.transpose(1, 2).reshape(B, L, D) @ p["out_proj.weight"].T
    if kind == "diff_v2":
        d = meta["head_dim"]
        q, _, _ = _rope((x @ p["q_proj.weight"].T).view(B, L, 2 * H, d))
        k, _, _ = _rope((x @ p["k_proj.weight"].T).view(B, L, G, d))
        v = (x @ p["v_proj.weight"].T).view(B, L, G, d)
        a = _softmax_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, 2H, L, d)
        lam = torch.sigmoid(x @ p["lambda_proj.weight"].T).transpose(1, 2)[..., None]
        o = a[:, 0::2] - lam * a[:, 1::2]
        return o.transpose(1, 2).reshape(B, L, H * d) @ p["o_proj.weight"].T
    raise ValueError(kind)


def make_case(kind, *, D, H, G, B, L, depth=0, seed=0):
    """(tensors, metadata) of one case in the fixture layout, float32."""
    g = torch.Generator().manual_seed(seed)
    Gk = G or H
    if kind == "vanilla":
        d = D // H
        shapes = {"q_proj.weight": (D, D), "k_proj.weight": (Gk * d, D), "v_proj.weight": (Gk * d, D),
                  "out_proj.weight": (D, D)}
    elif kind == "diff_v1":
        d = D // H // 2
        shapes = {"q_proj.weight": (D, D), "k_proj.weight": (Gk * 2 * d, D), "v_proj.weight": (Gk * 2 * d, D),
                  "out_proj.weight": (D, D), "lambda_q1": (d,), "lambda_k1": (d,), "lambda_q2": (d,),
                  "lambda_k2": (d,), "subln.weight": (2 * d,)}
    else:
        d = D // H
        shapes = {"q_proj.weight": (2 * H * d, D), "k_proj.weight": (Gk * d, D), "v_proj.weight": (Gk * d, D),
                  "o_proj.weight": (D, H * d), "lambda_proj.weight": (H, D)}
    meta = {"name": None, "kind": kind, "embed_dim": D, "depth": depth, "num_heads": H, "num_kv_heads": G,
            "B": B, "L": L, "seed": seed, "head_dim": d}
    if kind == "diff_v1":
        meta["lambda_init"] = 0.8 - 0.6 * math.exp(-0.3 * depth)
    p = {}
    for n, s in shapes.items():
        if n.startswith("lambda_") and n != "lambda_proj.weight":
            t = torch.randn(s, generator=g) * 0.1
        elif n == "subln.weight":
            t = 1 + 0.5 * torch.randn(s, generator=g)
        else:
            t = torch.randn(s, generator=g) / math.sqrt(s[-1])
        p[n] = t.requires_grad_()
    x = torch.randn(B, L, D, generator=g).requires_grad_()
    grad_out = torch.randn(B, L, D, generator=g)
    out = _forward(kind, p, x, meta)
    out.backward(grad_out)
    tensors = {"x": x, "out": out, "grad_out": grad_out, "grad_x": x.grad}
    tensors.update({f"param.{n}": t for n, t in p.items()})
    tensors.update({f"grad.{n}": t.grad for n, t in p.items()})
    return {k: v.detach().numpy().astype(np.float32) for k, v in tensors.items()}, meta


def write_file(path, cases: dict[str, dict]):
    """cases: name -> make_case kwargs (kind=..., D=..., ...)."""
    from safetensors.numpy import save_file

    tensors, metadata = {}, {}
    for name, kw in cases.items():
        t, meta = make_case(**kw)
        meta["name"] = name
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        metadata[name] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)
