"""The paired-softmax kernels as torch.library triton ops with autograd. One factory serves
DIFF V1 and V2; they differ in how the keys are paired (K_STEP, SHARED_K), in lambda's shape, and
so in how its gradient is reduced.

triton_op rather than custom_op: torch.compile traces into the op (its launcher runs once, on fake
tensors, at compile time) and Inductor launches the kernels from its generated code, where an
opaque custom op re-runs the Python launcher and Triton's JIT dispatch on every call (about 1.2 ms
a training step with the fused subln). Eagerly, either runs the same launcher; the launcher is
also the fake (shape) implementation. Under TRITON_INTERPRET the kernels cannot be traced (they
would run on fake tensors), so there the ops are opaque custom ops with shape-only fake kernels.

The ops close over the KernelOptions they launch with: each options value gets its own ops,
registered at first use (the defaults' at import, under the plain names diffattn::{name}_fwd / _bwd, others
with the options' tag appended), so a compiled graph bakes in the options it was traced with.
"""
import math

import torch
import torch.nn.functional as F

from ..norm import rms_norm
from ..triton_runtime import INTERPRETED, define
from . import launch as kernels
from .tuning import DEFAULT, KernelOptions

KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # tile widths are powers of two; 16 is Triton's smallest dot


def padded_head_dim(d):
    return next((w for w in KERNEL_HEAD_DIMS if w >= d), None)


def make_normed_op(name, k_step, shared_k, lam_rows, lam_grad, options: KernelOptions):
    """Registers diffattn::{name}_normed_fwd / _bwd: the attention of make_op followed by RMSNorm over
    each output row (DIFF V1's subln, weight (DV,) float32), the norm in the forward's epilogue and
    its backward in the pass that computes the deltas. Returns the forward op: (y, out, o2, lse).
    name carries the options' tag (see the module docstring)."""

    @define(f"diffattn::{name}_normed_fwd")
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        out, o2, lse, y = kernels.forward(q, k, v, lam_rows(lam, B, L, H2 // 2), k_step, shared_k, (weight, eps),
                                          options)
        return y, out, o2, lse

    @define(f"diffattn::{name}_normed_bwd")
    def bwd(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            weight: torch.Tensor, eps: float, out: torch.Tensor, o2: torch.Tensor, lse: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        dq, dk, dv, delta, dweight = kernels.backward(dy, q, k, v, lam_rows(lam, B, L, H2 // 2), out, o2, lse,
                                                      k_step, shared_k, (weight, eps), options)
        return dq, dk, dv, lam_grad(delta[:, :, 1], lam), dweight.to(weight.dtype)

    if INTERPRETED:
        @fwd.register_fake
        def _(q, k, v, lam, weight, eps):
            B, L, H2, _ = q.shape
            y = q.new_empty(B, L, H2 // 2, v.shape[3])
            return y, torch.empty_like(y), torch.empty_like(y), q.new_empty(B, H2 // 2, 2, L, dtype=torch.float32)

        @bwd.register_fake
        def _(dy, q, k, v, lam, weight, eps, out, o2, lse):
            return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape),
                    weight.new_empty(weight.shape))

    def setup_context(ctx, inputs, output):
        q, k, v, lam, weight, ctx.eps = inputs
        _, out, o2, lse = output
        ctx.save_for_backward(q, k, v, lam, weight, out, o2, lse)
        ctx.mark_non_differentiable(out, o2, lse)

    def backward(ctx, dy, _dout, _do2, _dlse):
        q, k, v, lam, weight, out, o2, lse = ctx.saved_tensors
        return *bwd(dy, q, k, v, lam, weight, ctx.eps, out, o2, lse), None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def make_op(name, k_step, shared_k, lam_rows, lam_grad, with_norm=False):
    """Returns fn(q, k, v, lam, norm=None, options=DEFAULT) -> out; norm = (weight, eps) gives
    RMSNorm(out) * weight. The ops it launches, diffattn::{name}_fwd / _bwd (with_norm: also the
    _normed_ pair of make_normed_op), are registered per options at first use.

    lam_rows(lam, B, L, H) gives lambda as a (B, L, H) view; lam_grad(d2, lam) turns
    d2 = rowsum(dO * o2) (B, H, L) into lambda's gradient (d out / d lam = -o2)."""

    registered = {}  # options.tag -> (fwd op, normed fwd op or None)

    def register(options: KernelOptions):
        tagged = name + (f"_{options.tag}" if options.tag else "")
        fwd = register_op(tagged, k_step, shared_k, lam_rows, lam_grad, options)
        normed = make_normed_op(tagged, k_step, shared_k, lam_rows, lam_grad, options) if with_norm else None
        registered[options.tag] = fwd, normed
        return fwd, normed

    def attention(q, k, v, lam, norm=None, options: KernelOptions = DEFAULT):
        if lam.device != q.device:
            raise ValueError(f"lambda is on {lam.device} but q is on {q.device}")
        if not isinstance(options, KernelOptions):
            raise TypeError(f"options must be a KernelOptions, got {type(options).__name__}")
        # a dict lookup by the options' tag, which torch.compile traces as a constant (the first call
        # with new options registers their ops, which has to happen eagerly)
        fwd, normed_fwd = registered.get(options.tag) or register(options)
        d, dv = q.shape[-1], v.shape[-1]
        dp = padded_head_dim(d)
        if norm is not None and normed_fwd is None:
            raise ValueError(f"{name} has no fused norm")
        if dp == d and norm is not None:
            weight, eps = norm
            return normed_fwd(q, k, v, lam, weight, float(eps))[0]
        if norm is not None:  # the padded columns would enter the norm's mean: norm outside the kernels
            return rms_norm(attention(q, k, v, lam, options=options), *norm)
        if dp == d:
            return fwd(q, k, v, lam)[0]
        # Other head dims run at the next kernel width: zero columns leave every q.k and the
        # kept output columns unchanged, and q is rescaled so the kernel's 1/sqrt(dp) acts as
        # 1/sqrt(d). Autograd slices the gradients back.
        q = F.pad(q, (0, dp - d)) * math.sqrt(dp / d)
        k = F.pad(k, (0, dp - d))
        v = F.pad(v, (0, dv * dp // d - dv))
        return fwd(q, k, v, lam)[0][..., :dv].contiguous()

    register(DEFAULT)  # the ops the model runs exist from import on
    return attention


def register_op(name, k_step, shared_k, lam_rows, lam_grad, options: KernelOptions):
    """Registers diffattn::{name}_fwd / _bwd launching with these options; returns the forward op:
    (out, o2, lse), differentiable in out."""

    @define(f"diffattn::{name}_fwd")
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        return kernels.forward(q, k, v, lam_rows(lam, B, L, H2 // 2), k_step, shared_k, options=options)

    @define(f"diffattn::{name}_bwd")
    def bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            out: torch.Tensor, o2: torch.Tensor, lse: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        dq, dk, dv, delta = kernels.backward(do, q, k, v, lam_rows(lam, B, L, H2 // 2), out, o2, lse, k_step, shared_k,
                                             options=options)
        return dq, dk, dv, lam_grad(delta[:, :, 1], lam)

    if INTERPRETED:
        @fwd.register_fake
        def _(q, k, v, lam):
            B, L, H2, _ = q.shape
            out = q.new_empty(B, L, H2 // 2, v.shape[3])
            return out, torch.empty_like(out), q.new_empty(B, H2 // 2, 2, L, dtype=torch.float32)

        @bwd.register_fake
        def _(do, q, k, v, lam, out, o2, lse):  # the kernels write contiguous gradients
            return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape)

    def setup_context(ctx, inputs, output):
        out, o2, lse = output
        ctx.save_for_backward(*inputs, out, o2, lse)
        ctx.mark_non_differentiable(o2, lse)  # internal: saved for the backward only

    def backward(ctx, dout, _do2, _dlse):
        return bwd(dout, *ctx.saved_tensors)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd
