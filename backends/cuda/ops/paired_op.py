"""The Triton paired-softmax kernels as torch.library triton ops with autograd. One factory serves
DIFF V1 and V2; they differ in how the keys are paired (K_STEP, SHARED_K), in lambda's shape, and
so in how its gradient is reduced.

triton_op rather than custom_op: torch.compile traces into the op (its launcher runs once, on fake
tensors, at compile time) and Inductor launches the kernels from its generated code. An opaque
custom op instead re-ran the Python launcher and Triton's JIT dispatch on every call, host time
that left the GPU idle before each attention call of a training step (docs/kernels.md, v6).
Eagerly, either runs the same launcher; the launcher is also the fake (shape) implementation.
Under TRITON_INTERPRET the kernels cannot be traced (they would run on fake tensors), so there the
ops are opaque custom ops with shape-only fake kernels."""
import math

import torch
import torch.nn.functional as F

from . import paired_softmax as kernels

KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # tile widths are powers of two; 16 is Triton's smallest dot


def padded_head_dim(d):
    return next((w for w in KERNEL_HEAD_DIMS if w >= d), None)


def make_op(name, k_step, shared_k, lam_rows, lam_grad):
    """Registers diffattn::{name}_fwd / _bwd and returns fn(q, k, v, lam) -> out.

    lam_rows(lam, B, L, H) gives lambda as a (B, L, H) view; lam_grad(d2, lam) turns
    d2 = rowsum(dO * o2) (B, H, L) into lambda's gradient (d out / d lam = -o2)."""

    define = torch.library.custom_op if kernels.INTERPRETED else torch.library.triton_op

    @define(f"diffattn::{name}_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        return kernels.forward(q, k, v, lam_rows(lam, B, L, H2 // 2), k_step, shared_k)

    @define(f"diffattn::{name}_bwd", mutates_args=())
    def bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            out: torch.Tensor, o2: torch.Tensor, lse: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        dq, dk, dv, delta = kernels.backward(do, q, k, v, lam_rows(lam, B, L, H2 // 2), out, o2, lse, k_step, shared_k)
        return dq, dk, dv, lam_grad(delta[:, :, 1], lam)

    if kernels.INTERPRETED:
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

    def attention(q, k, v, lam):
        if lam.device != q.device:
            raise ValueError(f"lambda is on {lam.device} but q is on {q.device}")
        d, dv = q.shape[-1], v.shape[-1]
        dp = padded_head_dim(d)
        if dp == d:
            return fwd(q, k, v, lam)[0]
        # Other head dims run at the next kernel width: zero columns leave every q.k and the
        # kept output columns unchanged, and q is rescaled so the kernel's 1/sqrt(dp) acts as
        # 1/sqrt(d). Autograd slices the gradients back.
        q = F.pad(q, (0, dp - d)) * math.sqrt(dp / d)
        k = F.pad(k, (0, dp - d))
        v = F.pad(v, (0, dv * dp // d - dv))
        return fwd(q, k, v, lam)[0][..., :dv].contiguous()

    return attention
