"""The Triton paired-softmax kernels as torch.library custom ops with autograd, so torch.compile
traces through them. One factory serves DIFF V1 and V2; they differ in how the keys are paired
(K_STEP, SHARED_K), in lambda's shape, and so in how its gradient is reduced."""
import torch

from . import paired_softmax as kernels


def make_op(name, k_step, shared_k, lam_rows, lam_grad):
    """Registers diffattn::{name}_fwd / _bwd and returns fn(q, k, v, lam) -> out.

    lam_rows(lam, B, L, H) gives lambda as a (B, L, H) view; lam_grad(d2, lam) turns
    d2 = rowsum(dO * o2) (B, H, L) into lambda's gradient (d out / d lam = -o2)."""

    @torch.library.custom_op(f"diffattn::{name}_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        return kernels.forward(q, k, v, lam_rows(lam, B, L, H2 // 2), k_step, shared_k)

    @fwd.register_fake
    def _(q, k, v, lam):
        B, L, H2, _ = q.shape
        out = q.new_empty(B, L, H2 // 2, v.shape[3])
        return out, torch.empty_like(out), q.new_empty(B, H2 // 2, 2, L, dtype=torch.float32)

    @torch.library.custom_op(f"diffattn::{name}_bwd", mutates_args=())
    def bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
            out: torch.Tensor, o2: torch.Tensor, lse: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, H2, _ = q.shape
        dq, dk, dv, delta = kernels.backward(do, q, k, v, lam_rows(lam, B, L, H2 // 2), out, o2, lse, k_step, shared_k)
        return dq, dk, dv, lam_grad(delta[:, :, 1], lam)

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
        out, _, _ = fwd(q, k, v, lam)
        return out

    return attention
