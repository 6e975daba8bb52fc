"""Launchers of the paired-softmax kernels: forward(...) and backward(...) pick tiles and paths from
the KernelOptions they are given, allocate the outputs and launch (through torch's wrap_triton,
so torch.compile traces the launches). The Gluon kernels of bwd_ws.py run as opaque custom ops:
Inductor re-emits a traced kernel's source as Triton, which a Gluon kernel is not.

    forward(q, k, v, lam_rows, k_step, shared_k, norm=None, options=DEFAULT) -> out, o2, lse[, y]
    backward(do, q, k, v, lam_rows, out, o2, lse, k_step, shared_k, norm=None, options=DEFAULT)
        -> dq, dk, dv, delta[, d weight]
"""
import math

import torch
import triton
from torch.library import wrap_triton

from ..norm import rms_norm
from ..triton_runtime import (INTERPRETED, LOG2E, descriptor_scratch, gluon_available, tma_aligned,
                              unit_last_stride)
from .bwd import paired_attention_bwd_delta, paired_attention_bwd_dkdv, paired_attention_bwd_dq
from .fwd import paired_attention_fwd
from .tuning import DEFAULT, KernelOptions, blocks, dkdv_diagonal, fwd_slices, pairs_together


def _use_tma(options: KernelOptions, *ts):
    """Tensor descriptors need sm_90+, a 16-byte aligned base and 16-byte multiples for every stride
    but the last; other inputs take the pointer path of the same kernels."""
    if not options.tma or INTERPRETED or not ts[0].is_cuda:
        return False
    if torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    if not all(map(tma_aligned, ts)):
        return False
    # kernels that build tensor descriptors need global scratch for them; Triton keeps the allocator
    # in a context variable, so it is set on every call (autograd runs the backward in its own thread)
    triton.set_allocator(descriptor_scratch)
    return True


def _gluon_takes(capability, *ts):
    """Whether the Gluon kernels (bwd_ws.py) can run on these tensors: sm_90 with Triton 3.6 (else a
    logged fallback), bf16, every tensor's heads side by side in a row and addressable by TMA."""
    if capability != (9, 0) or INTERPRETED:
        return False
    if not all(t.dtype == torch.bfloat16 and t.stride(2) == t.shape[3] and tma_aligned(t) for t in ts):
        return False
    return gluon_available()


def dkdv_ws_applies(q, k, v, do, shared_k, capability, options: KernelOptions = DEFAULT):
    """Whether V2's warp-specialized Gluon dK/dV kernel takes these inputs: V2 at head_dim 64."""
    return (options.dkdv_ws and shared_k and all(t.shape[3] == 64 for t in (q, k, v, do))
            and _gluon_takes(capability, q, k, v, do))


def dq_ws_applies(q, k, v, do, capability, options: KernelOptions = DEFAULT):
    """Whether the warp-specialized Gluon dQ kernel takes these inputs: V1 or V2 at head_dim 64
    (V 128 or 64 wide); V2 from options.dq_ws_v2_min_len keys on (below it the Triton dQ is faster)."""
    long_enough = v.shape[3] == 128 or q.shape[1] >= options.dq_ws_v2_min_len
    return (options.dq_ws and q.shape[3] == k.shape[3] == 64 and v.shape[3] in (64, 128) and long_enough
            and _gluon_takes(capability, q, k, v, do))


@torch.library.custom_op("diffattn::paired_dkdv_ws", mutates_args=())
def paired_dkdv_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam_rows: torch.Tensor,
                   lse: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gluon dK/dV kernel as an opaque op: this one launch stays a call into Python (none under
    CUDA graphs). Imported here: only Triton 3.6 has the Gluon API the kernels are written against."""
    from . import bwd_ws

    triton.set_allocator(descriptor_scratch)  # the kernel builds its tensor descriptors in global scratch
    return bwd_ws.dkdv(do, q, k, v, lam_rows, lse, delta)


@paired_dkdv_ws.register_fake
def _(do, q, k, v, lam_rows, lse, delta):
    return k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("diffattn::paired_dq_ws", mutates_args=())
def paired_dq_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam_rows: torch.Tensor,
                 lse: torch.Tensor, delta: torch.Tensor, k_step: int) -> torch.Tensor:
    """The Gluon dQ kernel as an opaque op (as paired_dkdv_ws)."""
    from . import bwd_ws

    triton.set_allocator(descriptor_scratch)
    return bwd_ws.dq(do, q, k, v, lam_rows, lse, delta, k_step)


@paired_dq_ws.register_fake
def _(do, q, k, v, lam_rows, lse, delta, k_step):
    return q.new_empty(q.shape)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 dots in full precision, never tf32


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def forward(q, k, v, lam_rows, k_step, shared_k, norm=None, options: KernelOptions = DEFAULT):
    """q (B,L,2H,D), k (B,L,KH,D), v (B,L,G,DV), lam_rows (B,L,H) (any strides, last dims contiguous)
    -> out (B,L,H,DV), o2 (B,L,H,DV), lse (B,H,2,L) float32; with norm = (weight (DV,), eps) also
    y = RMSNorm(out) * weight (in the kernel's epilogue when a program holds whole rows)."""
    B, L, H2, D = q.shape
    # heads and head dims are the model's and pick the kernels' constexprs: int() keeps them static
    # when torch.compile makes shapes dynamic (then only B and L stay symbolic)
    H, G, D, DV = int(H2) // 2, int(v.shape[2]), int(D), int(v.shape[3])
    q, k, v = map(unit_last_stride, (q, k, v))
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device)
    o2 = torch.empty_like(out)
    lse = torch.empty(B, H, 2, L, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = blocks("fwd", D, DV, q.dtype, shared_k, options)
    slices = fwd_slices(D, DV, q.dtype, options)
    sm_scale = 1.0 / math.sqrt(D)
    fused_norm = norm is not None and slices == 1
    y = torch.empty_like(out) if fused_norm else out
    weight, eps = norm if norm is not None else (out, 0.0)
    wrap_triton(paired_attention_fwd)[(B * H, triton.cdiv(L, bm) * slices)](
        q, k, v, lam_rows, out, o2, lse, y, weight, *_strides(q, k, v), *lam_rows.stride(), *out.stride()[:3],
        L, H, H // G, sm_scale * LOG2E, eps, D=D, DV=DV // slices, K_STEP=k_step, SHARED_K=shared_k,
        BLOCK_M=bm, BLOCK_N=bn, PREC=_precision(q.dtype), TMA=_use_tma(options, k, v), NORM=fused_norm,
        num_warps=warps, num_stages=stages)
    if norm is None:
        return out, o2, lse
    if not fused_norm:  # column slices: no program holds a whole row
        y = rms_norm(out, weight, eps)
    return out, o2, lse, y


def triton_dkdv(do, q, k, v, lam_rows, lse, delta, k_step, shared_k, options: KernelOptions = DEFAULT):
    """dK, dV (contiguous) by the Triton kernel, from the forward's LSE and the deltas; inputs as
    backward has them (unit last stride)."""
    B, L, H2, D = q.shape
    H, G, D, DV = int(H2) // 2, int(v.shape[2]), int(D), int(v.shape[3])
    dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    sm_scale = 1.0 / math.sqrt(D)
    # V1's lambda is one scalar (a zero-stride view): its -lam factor of dS2 leaves the dK/dV loop
    scalar_lam = not shared_k and all(st == 0 for st in lam_rows.stride())
    bm, bn, warps, stages = blocks("dkdv", D, DV, q.dtype, shared_k, options)
    l2_bytes = torch.cuda.get_device_properties(q.device).L2_cache_size if q.is_cuda else 0
    together = pairs_together(B * G, L * (H // G) * (2 * D + DV) * q.element_size(), l2_bytes, options)
    wrap_triton(paired_attention_bwd_dkdv)[(triton.cdiv(L, bn), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, *_strides(q, k, v, do), *lam_rows.stride(), *_strides(dk, dv),
        L, H, H // G, sm_scale * LOG2E, sm_scale, D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k,
        PREC=_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, SCALAR_LAM=scalar_lam,
        DIAGONAL=dkdv_diagonal(D, DV, q.dtype, options),
        GRADS_LIKE_INPUTS=dk.stride() == k.stride() and dv.stride() == v.stride(),
        PAIRS_TOGETHER=together, num_warps=warps, num_stages=stages)
    return dk, dv


def triton_dq(do, q, k, v, lam_rows, lse, delta, k_step, shared_k, options: KernelOptions = DEFAULT):
    """dQ (contiguous) by the Triton kernel; arguments as triton_dkdv's."""
    B, L, H2, D = q.shape
    H, G, D, DV = int(H2) // 2, int(v.shape[2]), int(D), int(v.shape[3])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sm_scale = 1.0 / math.sqrt(D)
    bm, bn, warps, stages = blocks("dq", D, DV, q.dtype, shared_k, options)
    wrap_triton(paired_attention_bwd_dq)[(B * H, triton.cdiv(L, bm))](
        q, k, v, do, lam_rows, lse, delta, dq, *_strides(q, k, v, do), *lam_rows.stride(), *_strides(dq), L, H,
        H // G, sm_scale * LOG2E, sm_scale, D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k, PREC=_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, TMA=_use_tma(options, k, v), num_warps=warps, num_stages=stages)
    return dq


def backward(do, q, k, v, lam_rows, out, o2, lse, k_step, shared_k, norm=None, options: KernelOptions = DEFAULT):
    """-> dq, dk, dv (contiguous, the inputs' shapes) and delta (B,H,2,L): [..., 1, :] is rowsum(dO * o2).
    With norm = (weight, eps), do is the gradient of forward's y, and d weight (float32) comes last."""
    B, L, H2, D = q.shape
    H, D, DV = int(H2) // 2, int(D), int(v.shape[3])  # static, as in forward
    # inputs are read with their strides (v is a slice of the fused projection: no copy of it); the
    # gradients are written contiguous
    q, k, v, do = map(unit_last_stride, (q, k, v, do))
    delta = torch.empty_like(lse)
    weight, eps = norm if norm is not None else (out, 0.0)
    bm, steps, warps, stages = blocks("delta" if norm is None else "norm_delta", D, DV, q.dtype, shared_k, options)
    row_programs = triton.cdiv(L, bm * steps)
    dy, dw_part = do, None
    if norm is not None:  # do becomes the norm's input gradient, computed in the same pass as the deltas
        do = torch.empty_like(out)
        dw_part = torch.empty(B * H * row_programs, DV, dtype=torch.float32, device=q.device)
    wrap_triton(paired_attention_bwd_delta)[(row_programs, B * H)](
        out, o2, dy, lam_rows, delta, weight, do, out if dw_part is None else dw_part, *out.stride()[:3],
        *dy.stride()[:3], *lam_rows.stride(), L, H, eps, DV=DV, BLOCK_M=bm, STEPS=steps, LOAD_STAGES=stages,
        NORM=norm is not None, num_warps=warps)
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    if dkdv_ws_applies(q, k, v, do, shared_k, capability, options):
        dk, dv = paired_dkdv_ws(do, q, k, v, lam_rows, lse, delta)
    else:
        dk, dv = triton_dkdv(do, q, k, v, lam_rows, lse, delta, k_step, shared_k, options)
    if dq_ws_applies(q, k, v, do, capability, options):
        dq = paired_dq_ws(do, q, k, v, lam_rows, lse, delta, k_step)
    else:
        dq = triton_dq(do, q, k, v, lam_rows, lse, delta, k_step, shared_k, options)
    if norm is None:
        return dq, dk, dv, delta
    return dq, dk, dv, delta, dw_part.sum(0)
