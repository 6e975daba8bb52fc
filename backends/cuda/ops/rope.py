"""The fused path's q, k, v: the fused qkv projection's output split into heads, q and k rotated
by RoPE, as one torch.library op with a Triton kernel each way.

    split_heads(qkv (B, L, C), cos, sin, q_heads, k_heads, v_heads, head_dim) -> q, k, v
        q (B, L, q_heads, d), k (B, L, k_heads, d), v (B, L, v_heads, C - (q_heads + k_heads) d / v_heads),
        contiguous; q and k columns in model.Rotary's half-split order, rotated as Rotary does:
        out[j] = x[j] cos[t, j] - x[j + d/2] sin[t, j],  out[j + d/2] = x[j + d/2] cos[t, j] + x[j] sin[t, j]
        with cos, sin (>= L, d/2) (any row stride) at position t.

Why an op: written with torch ops (model.Rotary on views of the projection), the backward of the
split is a cat of RoPE's backward of dq and dk with dv, which Inductor fuses into one kernel that
computes every input under masks; it moved 192 MB a layer at ~1.1 TB/s (177 us, stage1), a third
of the bandwidth RoPE's forward reached (docs/kernels.md, v7c). torch 2.11's cat options did not
change that kernel (v7b). Here the backward writes the projection's gradient
directly, one head slice at a time, and the forward copies v (its 32 MB read and write are what
the clean backward costs). The backward is the inverse rotation: the same kernel with -sin.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .triton_runtime import INTERPRETED, define, unit_last_stride

BLOCK_ROWS = 64  # tokens a program; one head each: 64 x 64 bf16 = 8 KB in, 8 KB out


@triton.jit
def rope_heads(src, src_off, s_b, s_l, s_h, dst, dst_off, d_b, d_l, d_h, cos, sin, t_l, n_rows, L,
               D: tl.constexpr, WIDTH: tl.constexpr, ROTATE: tl.constexpr, SIGN: tl.constexpr,
               BLOCK: tl.constexpr):
    """dst[b, l, h] = rotate(src[b, l, h]) (or a copy without ROTATE) for BLOCK rows (b, l) of one
    head h. Offsets in elements, last strides 1; WIDTH: D/2 (ROTATE) or D padded to a power of two."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    b, l = (rows // L).to(tl.int64), (rows % L).to(tl.int64)  # int64: B*L*C may pass 2^31 elements
    src_rows = src + src_off + b * s_b + l * s_l + head * s_h
    dst_rows = dst + dst_off + b * d_b + l * d_l + head * d_h
    j = tl.arange(0, WIDTH)
    if ROTATE:
        mask = (rows < n_rows)[:, None] & (j < D // 2)[None, :]
        x1 = tl.load(src_rows[:, None] + j[None, :], mask=mask).to(tl.float32)
        x2 = tl.load(src_rows[:, None] + D // 2 + j[None, :], mask=mask).to(tl.float32)
        c = tl.load(cos + l[:, None] * t_l + j[None, :], mask=mask).to(tl.float32)
        s = tl.load(sin + l[:, None] * t_l + j[None, :], mask=mask).to(tl.float32) * SIGN
        tl.store(dst_rows[:, None] + j[None, :], (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst_rows[:, None] + D // 2 + j[None, :], (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=mask)
    else:
        mask = (rows < n_rows)[:, None] & (j < D)[None, :]
        x = tl.load(src_rows[:, None] + j[None, :], mask=mask)
        tl.store(dst_rows[:, None] + j[None, :], x.to(dst.dtype.element_ty), mask=mask)


def _launch(src, src_off, src_strides, dst, dst_off, dst_strides, heads, d, cos, sin, rotate, sign):
    """One launch over B*L rows x `heads` heads of width d; strides (batch, position, head)."""
    B, L = src.shape[0], src.shape[1]
    width = triton.next_power_of_2(d // 2 if rotate else d)
    wrap_triton(rope_heads)[(triton.cdiv(B * L, BLOCK_ROWS), heads)](
        src, src_off, *src_strides, dst, dst_off, *dst_strides, cos, sin, cos.stride(0), B * L, L,
        D=d, WIDTH=width, ROTATE=rotate, SIGN=sign, BLOCK=BLOCK_ROWS)


def _parts(C, q_heads, k_heads, v_heads, d):
    """(first column, heads, width, rotated) of q, k and v in the projection's C columns."""
    dv = (C - (q_heads + k_heads) * d) // v_heads
    return ((0, q_heads, d, True), (q_heads * d, k_heads, d, True), ((q_heads + k_heads) * d, v_heads, dv, False))


@define("diffattn::split_heads")
def split_heads_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, k_heads: int,
                   v_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = unit_last_stride(qkv)
    B, L, C = qkv.shape
    outs = []
    for col, heads, width, rotate in _parts(int(C), q_heads, k_heads, v_heads, head_dim):
        out = torch.empty(B, L, heads, width, dtype=qkv.dtype, device=qkv.device)
        _launch(qkv, col, (qkv.stride(0), qkv.stride(1), width), out, 0, out.stride()[:3], heads, width, cos, sin,
                rotate, 1.0)
        outs.append(out)
    return tuple(outs)


@define("diffattn::split_heads_bwd")
def split_heads_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    B, L, q_heads, d = dq.shape
    k_heads, v_heads = int(dk.shape[2]), int(dv.shape[2])
    C = (int(q_heads) + k_heads) * int(d) + v_heads * int(dv.shape[3])
    dqkv = torch.empty(B, L, C, dtype=dq.dtype, device=dq.device)
    parts = _parts(C, int(q_heads), k_heads, v_heads, int(d))
    for grad, (col, heads, width, rotate) in zip((dq, dk, dv), parts):
        grad = unit_last_stride(grad)
        _launch(grad, 0, grad.stride()[:3], dqkv, col, (dqkv.stride(0), dqkv.stride(1), width), heads, width, cos,
                sin, rotate, -1.0)
    return dqkv


if INTERPRETED:  # opaque custom ops there (triton_runtime.define): their shapes
    @split_heads_op.register_fake
    def _(qkv, cos, sin, q_heads, k_heads, v_heads, head_dim):
        B, L, C = qkv.shape
        return tuple(qkv.new_empty(B, L, heads, width) for _, heads, width, _ in _parts(C, q_heads, k_heads, v_heads,
                                                                                        head_dim))

    @split_heads_bwd.register_fake
    def _(dq, dk, dv, cos, sin):
        B, L = dq.shape[:2]
        return dq.new_empty(B, L, sum(g.shape[2] * g.shape[3] for g in (dq, dk, dv)))


def _setup_context(ctx, inputs, output):
    _, cos, sin, *_ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return split_heads_bwd(dq, dk, dv, cos, sin), None, None, None, None, None, None


split_heads_op.register_autograd(_backward, setup_context=_setup_context)


def split_heads(qkv, cos, sin, q_heads, k_heads, v_heads, head_dim):
    """See the module docstring; checks what the kernels assume, in one-line errors."""
    B, L, C = qkv.shape
    if head_dim % 2 or C <= (q_heads + k_heads) * head_dim or (C - (q_heads + k_heads) * head_dim) % v_heads:
        raise ValueError(f"split_heads: {C} projection columns do not hold {q_heads} + {k_heads} heads of an even "
                         f"head_dim {head_dim} and {v_heads} value heads")
    if cos.shape != sin.shape or cos.shape[0] < L or cos.shape[1] != head_dim // 2 or cos.stride() != sin.stride() \
            or cos.stride(1) != 1:
        raise ValueError(f"split_heads: cos and sin must be (>= {L}, {head_dim // 2}) tables of one layout with unit "
                         f"last stride, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return split_heads_op(qkv, cos, sin, q_heads, k_heads, v_heads, head_dim)
