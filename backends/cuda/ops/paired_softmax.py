"""Triton kernels for causal attention with two softmax maps per output head (DIFF V1 and V2).

Output head i reads query sub-heads 2i (map 1) and 2i+1 (map 2) and kv head g = i // GROUP:
    out_i = softmax(q1 k1^T s) v - lam * softmax(q2 k2^T s) v
DIFF V1: k1, k2 are key sub-heads 2g, 2g+1 (K_STEP=2, SHARED_K=False), v is 2d wide, lam one
scalar (passed with zero strides). DIFF V2: k1 = k2 = key head g (K_STEP=1, SHARED_K=True), v is
d wide, lam one value per (batch, position, head).

Forward: one pass over the K/V tiles with both maps' online softmax side by side, so each V tile
is loaded once for both maps; the lambda combine happens in the epilogue. Saved for the backward:
the combined output, map 2's output o2 (map 1's is out + lam * o2) and each map's log-sum-exp
(base 2, scale folded in). No L x L tensor is ever stored.

Backward (the method of Triton's fused-attention tutorial, extended to two maps): with
dO1 = dO, dO2 = -lam dO and dP = dO V^T shared by both maps,
    delta1 = rowsum(dO * o1), delta2' = rowsum(dO * o2)            (preprocess kernel)
    dV  += (P1 - lam P2)^T dO                                        (one matmul for both maps)
    dS1  = P1 (dP - delta1),   dS2 = -lam P2 (dP - delta2')
    dQm  = s dSm Km,   dKm = s dSm^T Qm,   d lam = -delta2' (per row; V1 sums it)
dK/dV come from a kernel that keeps one K/V block resident and walks the query blocks of every
query head of its group (no atomics); dQ from a kernel that keeps a query block resident. On
sm_90 the same sums run in warp-specialized Gluon kernels where they apply (paired_softmax_ws.py):
V2's dK/dV (dkdv_ws_applies) and both variants' dQ (dq_ws_applies).
Causal: blocks left of the diagonal run unmasked, the diagonal blocks masked; rows past L read
lse = +inf so their probabilities are exactly 0.
"""
import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .norm import rms_norm


def _fix_interpreter_loop_bounds():
    """Triton 3.6's interpreter turns a scalar into a loop bound with int() of a 1-element array,
    which numpy >= 2.4 refuses; use .item() instead (interpreter only, compiled kernels untouched)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixed_loop_bounds", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch.fixed_loop_bounds = True
    interpreter._patch_lang_tensor = patch


# Triton decides at @triton.jit time whether the kernels below are interpreted, so this is read once
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    _fix_interpreter_loop_bounds()


@triton.jit
def _kv_block(k1_src, k2_src, v_src, skl, svl, start_n, L, D: tl.constexpr, DV: tl.constexpr,
              SHARED_K: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Key rows start_n.. of both key sub-heads (one, if shared) and of V; rows past L read 0.
    The sources are tensor descriptors when TMA (the copy engine zero-fills past L), else pointers."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k1 = k1_src.load([start_n, 0])
        if SHARED_K:
            k2 = k1
        else:
            k2 = k2_src.load([start_n, 0])
        v = v_src.load([start_n, 0])
    else:
        kv_ok = (offs_n < L)[:, None]
        k1 = tl.load(k1_src + offs_n[:, None] * skl + tl.arange(0, D)[None, :], mask=kv_ok, other=0.0)
        if SHARED_K:
            k2 = k1
        else:
            k2 = tl.load(k2_src + offs_n[:, None] * skl + tl.arange(0, D)[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_src + offs_n[:, None] * svl + tl.arange(0, DV)[None, :], mask=kv_ok, other=0.0)
    return offs_n, k1, k2, v


@triton.jit
def _kv_sources(k1_base, k2_base, v_base, skl, svl, L, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr,
                BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """What _kv_block reads from: (L, D) / (L, DV) tensor descriptors of this head when TMA, else the bases."""
    if TMA:
        k1_src = tl.make_tensor_descriptor(k1_base, shape=[L, D], strides=[skl, 1], block_shape=[BLOCK_N, D])
        if SHARED_K:
            k2_src = k1_src
        else:
            k2_src = tl.make_tensor_descriptor(k2_base, shape=[L, D], strides=[skl, 1], block_shape=[BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[L, DV], strides=[svl, 1], block_shape=[BLOCK_N, DV])
    else:
        k1_src, k2_src, v_src = k1_base, k2_base, v_base
    return k1_src, k2_src, v_src


@triton.jit
def _fwd_tile(q1, q2, m1, l1, acc1, m2, l2, acc2, k1_src, k2_src, v_src, skl, svl, start_n, offs_m, L,
              qk_scale, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    offs_n, k1, k2, v = _kv_block(k1_src, k2_src, v_src, skl, svl, start_n, L, D, DV, SHARED_K, BLOCK_N, TMA)
    s1 = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    s2 = tl.dot(q2, tl.trans(k2), input_precision=PREC)
    if MASK:
        future = offs_m[:, None] < offs_n[None, :]
        s1 = tl.where(future, float("-inf"), s1)
        s2 = tl.where(future, float("-inf"), s2)
    # the row max is taken on the raw scores (qk_scale > 0), so scaling and shifting is one FMA
    m1_new = tl.maximum(m1, tl.max(s1, 1) * qk_scale)
    m2_new = tl.maximum(m2, tl.max(s2, 1) * qk_scale)
    p1 = tl.math.exp2(s1 * qk_scale - m1_new[:, None])
    p2 = tl.math.exp2(s2 * qk_scale - m2_new[:, None])
    alpha1 = tl.math.exp2(m1 - m1_new)
    alpha2 = tl.math.exp2(m2 - m2_new)
    l1 = l1 * alpha1 + tl.sum(p1, 1)
    l2 = l2 * alpha2 + tl.sum(p2, 1)
    acc1 = tl.dot(p1.to(v.dtype), v, acc1 * alpha1[:, None], input_precision=PREC)
    acc2 = tl.dot(p2.to(v.dtype), v, acc2 * alpha2[:, None], input_precision=PREC)
    return m1_new, l1, acc1, m2_new, l2, acc2


@triton.jit
def _query_rows(pid_m, L, H, GROUP, BLOCK_M: tl.constexpr):
    """This program's (batch, output head i, kv head g) and query rows. Grid axis 0 is (batch, head);
    the launchers walk axis 1 backwards (pid_m), so the query blocks with the most keys start first
    and the short ones fill the last wave. Q is not an argument: torch.compile's mutation analysis
    counts every argument of a call whose results address a store as written, and would copy Q."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    i = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, i, i // GROUP, pid_m * BLOCK_M, offs_m, offs_m < L


@triton.jit
def _query_tiles(Q, sqb, sql, sqh, b, i, offs_m, row_ok, D: tl.constexpr):
    """Both query sub-heads' tiles of output head i."""
    q_off = b * sqb + (2 * i) * sqh + offs_m[:, None] * sql + tl.arange(0, D)[None, :]
    return (tl.load(Q + q_off, mask=row_ok[:, None], other=0.0),
            tl.load(Q + q_off + sqh, mask=row_ok[:, None], other=0.0))


@triton.jit
def paired_attention_fwd(Q, K, V, LAM, OUT, O2, LSE, Y, W,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, slb, sll, slh, sob, sol, soh,
                         L, H, GROUP, qk_scale, eps,
                         D: tl.constexpr, DV: tl.constexpr, K_STEP: tl.constexpr, SHARED_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                         TMA: tl.constexpr, NORM: tl.constexpr):
    """DV here is the slice of V's columns this program computes (V's whole width, or a part of it
    when two (BLOCK_M, width) accumulators would not fit in registers): program_id(1) enumerates
    (query block, column slice), backwards; each slice recomputes both maps' scores.
    NORM (whole rows only): also Y = RMSNorm(out) * W, DIFF V1's subln, from the rounded output."""
    # Inductor passes Python floats as fp64; Triton's JIT as fp32
    qk_scale, eps = tl.cast(qk_scale, tl.float32), tl.cast(eps, tl.float32)
    n_slices = tl.num_programs(1) // tl.cdiv(L, BLOCK_M)
    job = tl.num_programs(1) - 1 - tl.program_id(1)
    pid_m = job // n_slices
    col0 = (job % n_slices) * DV
    b, i, g, diag, offs_m, row_ok = _query_rows(pid_m, L, H, GROUP, BLOCK_M)
    q1, q2 = _query_tiles(Q, sqb, sql, sqh, b, i, offs_m, row_ok, D)
    k1_base = K + b * skb + (g * K_STEP) * skh
    k1_src, k2_src, v_src = _kv_sources(k1_base, k1_base + skh, V + b * svb + g * svh + col0, skl, svl, L, D, DV,
                                        SHARED_K, BLOCK_N, TMA)

    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV], tl.float32)
    acc2 = tl.zeros([BLOCK_M, DV], tl.float32)
    for start_n in range(0, diag, BLOCK_N):  # fully visible blocks
        m1, l1, acc1, m2, l2, acc2 = _fwd_tile(q1, q2, m1, l1, acc1, m2, l2, acc2, k1_src, k2_src, v_src,
                                               skl, svl, start_n, offs_m, L, qk_scale, D, DV, SHARED_K,
                                               BLOCK_N, False, PREC, TMA)
    for start_n in range(diag, tl.minimum(diag + BLOCK_M, L), BLOCK_N):  # the diagonal, masked
        m1, l1, acc1, m2, l2, acc2 = _fwd_tile(q1, q2, m1, l1, acc1, m2, l2, acc2, k1_src, k2_src, v_src,
                                               skl, svl, start_n, offs_m, L, qk_scale, D, DV, SHARED_K,
                                               BLOCK_N, True, PREC, TMA)

    lam = tl.load(LAM + b * slb + offs_m * sll + i * slh, mask=row_ok, other=0.0).to(tl.float32)
    o1 = acc1 / l1[:, None]
    o2 = acc2 / l2[:, None]
    o_ptrs = b * sob + offs_m[:, None] * sol + i * soh + col0 + tl.arange(0, DV)[None, :]
    out = (o1 - lam[:, None] * o2).to(OUT.dtype.element_ty)
    tl.store(OUT + o_ptrs, out, mask=row_ok[:, None])
    if NORM:  # normalized from the stored (rounded) values, which the backward reads
        x = out.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, 1) / DV + eps)
        w = tl.load(W + tl.arange(0, DV)).to(tl.float32)
        tl.store(Y + o_ptrs, (x * r[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=row_ok[:, None])
    tl.store(O2 + o_ptrs, o2.to(O2.dtype.element_ty), mask=row_ok[:, None])
    lse_base = LSE + (b * H + i) * 2 * L
    first = row_ok & ((offs_m * 0 + col0) == 0)  # one slice writes the shared statistics
    # (a vector mask: Triton 3.9's interpreter refuses a scalar-and-vector one)
    tl.store(lse_base + offs_m, m1 + tl.math.log2(l1), mask=first)
    tl.store(lse_base + L + offs_m, m2 + tl.math.log2(l2), mask=first)


@triton.jit
def paired_attention_bwd_delta(OUT, O2, DO, LAM, DELTA, W, DX, DW_PART, sob, sol, soh, sdb, sdl, sdh, slb, sll, slh,
                               L, H, eps, DV: tl.constexpr, BLOCK_M: tl.constexpr, STEPS: tl.constexpr,
                               LOAD_STAGES: tl.constexpr, NORM: tl.constexpr):
    """delta1 = rowsum(dO * (out + lam o2)) and delta2' = rowsum(dO * o2), per (batch, head, row),
    for STEPS consecutive blocks of BLOCK_M rows per program.
    NORM: DO is the gradient of y = RMSNorm(out) * W (DIFF V1's subln), whose backward comes first:
    with x = out as stored, r = 1 / sqrt(mean(x^2) + eps) and g = dy * w,
        dx = r (g - x r mean(g x r))  -> DX (OUT's strides), the dO of the other kernels,
        d w = sum over rows of dy x r -> DW_PART (one row of partial sums per program),
    and the deltas take dx rounded to the inputs' dtype, as the other kernels read it. d w's sum over
    rows crosses warps; it is accumulated in registers over the program's blocks and reduced once."""
    eps = tl.cast(eps, tl.float32)  # fp64 from Inductor
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    i = bh % H
    offs_dv = tl.arange(0, DV)
    base = DELTA + (b * H + i) * 2 * L
    if NORM:
        w = tl.load(W + offs_dv).to(tl.float32)
        dw = tl.zeros([BLOCK_M, DV], tl.float32)
    # LOAD_STAGES > 1 prefetches the next blocks' tiles (cp.async): Triton pipelines loads that feed
    # no dot only in a loop that asks for it
    for step in tl.range(0, STEPS, num_stages=LOAD_STAGES):
        offs_m = (pid_m * STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        o_off = b * sob + offs_m[:, None] * sol + i * soh + offs_dv[None, :]
        out = tl.load(OUT + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
        o2 = tl.load(O2 + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdb + offs_m[:, None] * sdl + i * sdh + offs_dv[None, :], mask=row_ok[:, None],
                     other=0.0).to(tl.float32)
        lam = tl.load(LAM + b * slb + offs_m * sll + i * slh, mask=row_ok, other=0.0).to(tl.float32)
        if NORM:  # rows past L read zeros: they add nothing to d w
            r = tl.math.rsqrt(tl.sum(out * out, 1) / DV + eps)
            xhat = out * r[:, None]
            g = do * w[None, :]
            dx = (r[:, None] * (g - xhat * (tl.sum(g * xhat, 1) / DV)[:, None])).to(DX.dtype.element_ty)
            tl.store(DX + o_off, dx, mask=row_ok[:, None])
            dw += do * xhat
            do = dx.to(tl.float32)
        tl.store(base + offs_m, tl.sum(do * (out + lam[:, None] * o2), 1), mask=row_ok)
        tl.store(base + L + offs_m, tl.sum(do * o2, 1), mask=row_ok)
    if NORM:
        tl.store(DW_PART + (bh * tl.num_programs(0) + pid_m) * DV + offs_dv, tl.sum(dw, 0))


@triton.jit
def _dkdv_step(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base, sql, sqh, sdl, sll,
               start_m, offs_n, L, qk_scale, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr,
               BLOCK_M: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, SCALAR_LAM: tl.constexpr):
    """One query block's contribution to a resident K/V block, in transposed form (keys on rows).
    With SCALAR_LAM (V1) map 2's factor -lam stays out of dS2 (one multiply per score fewer) and
    scales dK2 once at the end. (V2's lam, one per query, could scale q2's rows instead: measured
    slower, +2-60%, and less accurate, the scaled q2 rounded to 16 bits; docs/kernels.md.)"""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    q_ptrs = q_base + offs_m[:, None] * sql + tl.arange(0, D)[None, :]
    q1 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_ptrs + sqh, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdl + tl.arange(0, DV)[None, :], mask=row_ok[:, None], other=0.0)
    lse1 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.load(lse_base + L + offs_m, mask=row_ok, other=float("inf"))
    delta1 = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    delta2 = tl.load(delta_base + L + offs_m, mask=row_ok, other=0.0)
    if SCALAR_LAM:
        lam = tl.load(lam_base).to(tl.float32)
    else:
        lam = tl.load(lam_base + offs_m * sll, mask=row_ok, other=0.0).to(tl.float32)[None, :]

    p1t = tl.math.exp2(tl.dot(k1, tl.trans(q1), input_precision=PREC) * qk_scale - lse1[None, :])
    p2t = tl.math.exp2(tl.dot(k2, tl.trans(q2), input_precision=PREC) * qk_scale - lse2[None, :])
    if MASK:
        visible = offs_m[None, :] >= offs_n[:, None]
        p1t = tl.where(visible, p1t, 0.0)
        p2t = tl.where(visible, p2t, 0.0)
    dv = tl.dot((p1t - lam * p2t).to(do.dtype), do, dv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds1t = p1t * (dpt - delta1[None, :])
    if SCALAR_LAM:
        ds2t = p2t * (dpt - delta2[None, :])
    else:
        ds2t = -lam * p2t * (dpt - delta2[None, :])
    if SHARED_K:
        dk1 = tl.dot(ds1t.to(q1.dtype), q1, dk1, input_precision=PREC)
        dk1 = tl.dot(ds2t.to(q2.dtype), q2, dk1, input_precision=PREC)
    else:
        dk1 = tl.dot(ds1t.to(q1.dtype), q1, dk1, input_precision=PREC)
        dk2 = tl.dot(ds2t.to(q2.dtype), q2, dk2, input_precision=PREC)
    return dk1, dk2, dv


@triton.jit
def _dkdv_diagonal(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base, sql, sqh, sdl, sll,
                   diag, offs_n, L, qk_scale, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SCALAR_LAM: tl.constexpr,
                   UNROLLED: tl.constexpr):
    """The query blocks that cross the K/V block's diagonal (masked), as a loop or unrolled."""
    if UNROLLED:
        for j in tl.static_range(BLOCK_N // BLOCK_M):
            dk1, dk2, dv = _dkdv_step(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base,
                                      sql, sqh, sdl, sll, diag + j * BLOCK_M, offs_n, L, qk_scale, D, DV, SHARED_K,
                                      BLOCK_M, True, PREC, SCALAR_LAM)
    else:
        for start_m in range(diag, diag + BLOCK_N, BLOCK_M):
            dk1, dk2, dv = _dkdv_step(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base,
                                      sql, sqh, sdl, sll, start_m, offs_n, L, qk_scale, D, DV, SHARED_K,
                                      BLOCK_M, True, PREC, SCALAR_LAM)
    return dk1, dk2, dv


@triton.jit
def dkdv_launch_order(PAIRS_TOGETHER: tl.constexpr):
    """The (key block, batch x kv head pair) this dK/dV program computes, on the grid (key blocks,
    pairs), whose programs launch in order of program_id(1) * num_programs(0) + program_id(0).
    PAIRS_TOGETHER pairs run at a time, every pair's key block 0 (the one with the most query
    blocks under the causal mask) before any pair's block 1, and so on, so the last wave holds
    light blocks; a group's blocks stay close in launch order, where they share their Q and dO rows
    in L2. 1: one pair's blocks after another's (the grid's own order)."""
    if PAIRS_TOGETHER == 1:  # as the grid lies: ptxas allocates the kernel differently otherwise
        return tl.program_id(0), tl.program_id(1)
    n_blocks = tl.num_programs(0)
    job = tl.program_id(1) * n_blocks + tl.program_id(0)
    first = job // (PAIRS_TOGETHER * n_blocks) * PAIRS_TOGETHER
    width = tl.minimum(PAIRS_TOGETHER, tl.num_programs(1) - first)  # the last group may be short
    r = job - first * n_blocks
    return r // width, first + r % width


@triton.jit
def paired_attention_bwd_dkdv(Q, K, V, DO, LAM, LSE, DELTA, DK, DV_,
                              sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh, slb, sll, slh,
                              sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, L, H, GROUP, qk_scale, sm_scale,
                              D: tl.constexpr, DV: tl.constexpr, K_STEP: tl.constexpr, SHARED_K: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                              SCALAR_LAM: tl.constexpr, DIAGONAL: tl.constexpr, GRADS_LIKE_INPUTS: tl.constexpr,
                              PAIRS_TOGETHER: tl.constexpr):
    """dK, dV of one K/V block of kv head g, summed over the GROUP output heads that read it.
    DK and DV_ have their own strides (sgk*, sgv*); GRADS_LIKE_INPUTS: they equal K's and V's.
    DIAGONAL places the masked query blocks that cross the block's diagonal: "first" (a loop before
    the others), "unrolled" (first, unrolled) or "last" (a loop after). The order changes only the
    summation order; what it changes for speed is whether ptxas keeps the warpgroup MMAs
    asynchronous (see DKDV_DIAGONAL). PAIRS_TOGETHER: see dkdv_launch_order."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    pid_n, bg = dkdv_launch_order(PAIRS_TOGETHER)
    G = H // GROUP
    b = (bg // G).to(tl.int64)
    g = bg % G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_ok = (offs_n < L)[:, None]
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k_off = b * skb + (g * K_STEP) * skh + offs_n[:, None] * skl + offs_d[None, :]
    v_off = b * svb + g * svh + offs_n[:, None] * svl + offs_dv[None, :]
    k1 = tl.load(K + k_off, mask=kv_ok, other=0.0)
    if SHARED_K:
        k2 = k1
    else:
        k2 = tl.load(K + k_off + skh, mask=kv_ok, other=0.0)
    v = tl.load(V + v_off, mask=kv_ok, other=0.0)
    dk1 = tl.zeros([BLOCK_N, D], tl.float32)
    dk2 = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    diag = pid_n * BLOCK_N
    for r in range(0, GROUP):
        i = g * GROUP + r
        q_base = Q + b * sqb + (2 * i) * sqh
        do_base = DO + b * sdb + i * sdh
        lse_base = LSE + (b * H + i) * 2 * L
        delta_base = DELTA + (b * H + i) * 2 * L
        lam_base = LAM + b * slb + i * slh
        if DIAGONAL != "last":
            dk1, dk2, dv = _dkdv_diagonal(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base,
                                          sql, sqh, sdl, sll, diag, offs_n, L, qk_scale, D, DV, SHARED_K, BLOCK_M,
                                          BLOCK_N, PREC, SCALAR_LAM, DIAGONAL == "unrolled")
        for start_m in range(diag + BLOCK_N, L, BLOCK_M):  # query blocks that see the whole K/V block
            dk1, dk2, dv = _dkdv_step(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base,
                                      sql, sqh, sdl, sll, start_m, offs_n, L, qk_scale, D, DV, SHARED_K,
                                      BLOCK_M, False, PREC, SCALAR_LAM)
        if DIAGONAL == "last":
            dk1, dk2, dv = _dkdv_diagonal(k1, k2, v, dk1, dk2, dv, q_base, do_base, lse_base, delta_base, lam_base,
                                          sql, sqh, sdl, sll, diag, offs_n, L, qk_scale, D, DV, SHARED_K, BLOCK_M,
                                          BLOCK_N, PREC, SCALAR_LAM, False)
    # with the loads' offsets ptxas allocates the main loop as before v5b: V2 d64 fwd+bwd ~4% faster than
    # with offsets of the gradients' own (runs 21-23, docs/kernels.md v8)
    if GRADS_LIKE_INPUTS:
        dk_off, dk_head, dv_off = k_off, skh, v_off
    else:
        dk_off = b * sgkb + (g * K_STEP) * sgkh + offs_n[:, None] * sgkl + offs_d[None, :]
        dk_head, dv_off = sgkh, b * sgvb + g * sgvh + offs_n[:, None] * sgvl + offs_dv[None, :]
    tl.store(DK + dk_off, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    if not SHARED_K:
        if SCALAR_LAM:
            dk2 = dk2 * -tl.load(LAM + b * slb + (g * GROUP) * slh).to(tl.float32)
        tl.store(DK + dk_off + dk_head, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV_ + dv_off, dv.to(DV_.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_step(q1, q2, do, lse1, lse2, delta1, delta2, dq1, dq2, k1_src, k2_src, v_src, skl, svl, start_n,
             offs_m, L, qk_scale, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    offs_n, k1, k2, v = _kv_block(k1_src, k2_src, v_src, skl, svl, start_n, L, D, DV, SHARED_K, BLOCK_N, TMA)
    p1 = tl.math.exp2(tl.dot(q1, tl.trans(k1), input_precision=PREC) * qk_scale - lse1[:, None])
    p2 = tl.math.exp2(tl.dot(q2, tl.trans(k2), input_precision=PREC) * qk_scale - lse2[:, None])
    if MASK:
        visible = offs_m[:, None] >= offs_n[None, :]
        p1 = tl.where(visible, p1, 0.0)
        p2 = tl.where(visible, p2, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds1 = p1 * (dp - delta1[:, None])
    ds2 = p2 * (dp - delta2[:, None])  # -lam (one per query row) scales dQ2 once, at the end
    dq1 = tl.dot(ds1.to(k1.dtype), k1, dq1, input_precision=PREC)
    dq2 = tl.dot(ds2.to(k2.dtype), k2, dq2, input_precision=PREC)
    return dq1, dq2


@triton.jit
def paired_attention_bwd_dq(Q, K, V, DO, LAM, LSE, DELTA, DQ,
                            sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh, slb, sll, slh,
                            sgqb, sgql, sgqh, L, H, GROUP, qk_scale, sm_scale,
                            D: tl.constexpr, DV: tl.constexpr, K_STEP: tl.constexpr, SHARED_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                            TMA: tl.constexpr):
    """dQ of one query block of output head i (both sub-heads). DQ has its own strides (sgq*)."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from Inductor
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b, i, g, diag, offs_m, row_ok = _query_rows(pid_m, L, H, GROUP, BLOCK_M)
    q1, q2 = _query_tiles(Q, sqb, sql, sqh, b, i, offs_m, row_ok, D)
    do = tl.load(DO + b * sdb + i * sdh + offs_m[:, None] * sdl + tl.arange(0, DV)[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse_base = LSE + (b * H + i) * 2 * L
    delta_base = DELTA + (b * H + i) * 2 * L
    lse1 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.load(lse_base + L + offs_m, mask=row_ok, other=float("inf"))
    delta1 = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    delta2 = tl.load(delta_base + L + offs_m, mask=row_ok, other=0.0)
    lam = tl.load(LAM + b * slb + offs_m * sll + i * slh, mask=row_ok, other=0.0).to(tl.float32)
    k1_base = K + b * skb + (g * K_STEP) * skh
    k1_src, k2_src, v_src = _kv_sources(k1_base, k1_base + skh, V + b * svb + g * svh, skl, svl, L, D, DV,
                                        SHARED_K, BLOCK_N, TMA)
    dq1 = tl.zeros([BLOCK_M, D], tl.float32)
    dq2 = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, diag, BLOCK_N):
        dq1, dq2 = _dq_step(q1, q2, do, lse1, lse2, delta1, delta2, dq1, dq2, k1_src, k2_src, v_src, skl,
                            svl, start_n, offs_m, L, qk_scale, D, DV, SHARED_K, BLOCK_N, False, PREC, TMA)
    for start_n in range(diag, tl.minimum(diag + BLOCK_M, L), BLOCK_N):
        dq1, dq2 = _dq_step(q1, q2, do, lse1, lse2, delta1, delta2, dq1, dq2, k1_src, k2_src, v_src, skl,
                            svl, start_n, offs_m, L, qk_scale, D, DV, SHARED_K, BLOCK_N, True, PREC, TMA)
    dq_off = b * sgqb + (2 * i) * sgqh + offs_m[:, None] * sgql + tl.arange(0, D)[None, :]
    tl.store(DQ + dq_off, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DQ + dq_off + sgqh, (dq2 * (-lam[:, None] * sm_scale)).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---- launchers -----------------------------------------------------------------------------------

LOG2E = 1.4426950408889634

# Block shapes per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M the query block,
# BLOCK_N the key block. The diagonal loops need the resident block to be a multiple of the walked
# one (fwd, dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0). The float32 accumulators set
# the budget (at most ~128 registers a thread): the forward holds two (BLOCK_M, DV), dK/dV one
# (BLOCK_N, DV + D or 2D), dQ two (BLOCK_M, D). Float32 inputs (for accuracy checks) get small
# tiles so K/V stages fit in shared memory. TUNED holds the 16-bit shapes measured best by
# benchmarks/scripts/kernels_sweep.py on the H100 and, for d 64, again on the H200 at L = 2k/8k/16k
# with TMA loads (docs/kernels.md); other shapes follow the rules below.
# Benchmarks may set OVERRIDES[(kernel, D, DV, itemsize)].
TUNED = {  # (kernel, D, DV) -> tile, 16-bit inputs
    ("fwd", 64, 128): (128, 64, 8, 3),
    ("fwd", 64, 64): (64, 64, 4, 3),
    ("fwd", 128, 256): (128, 64, 8, 3),  # per column slice of 128 (FWD_SLICES)
    ("fwd", 128, 128): (128, 64, 8, 4),
    ("dkdv", 64, 128): (32, 64, 4, 3),  # v13: two CTAs an SM (sweep f331499)
    ("dkdv", 64, 64): (64, 128, 8, 3),
    ("dkdv", 128, 256): (32, 128, 8, 2),
    ("dq", 64, 128): (64, 64, 4, 2),
    ("dq", 64, 64): (64, 64, 4, 3),
    ("dq", 128, 256): (128, 32, 8, 2),
    ("dq", 128, 128): (64, 32, 4, 2),
}
# Forward column slices: DIFF V1 at d 128 has V 256 wide, and two (BLOCK_M, 256) accumulators spill;
# two programs per query block, each owning 128 columns, recompute the scores (+33% FLOPs) instead.
FWD_SLICES = {(128, 256, 2): 2}
OVERRIDES = {}
# "tma": the forward and dQ kernels load K/V tiles through tensor descriptors (Hopper's bulk copy
# engine) instead of pointer arithmetic; measured on/off by benchmarks/scripts/kernels_sweep.py.
# Where the dK/dV kernel walks its diagonal query blocks, per (D, DV) of 16-bit inputs (sweep 8,
# docs/kernels.md). With "first", ptxas 12.8 waits for every wgmma before issuing the next (its
# advisory C7515) but allocates with the fewest spills; "last" and "unrolled" keep the MMAs
# asynchronous at the price of more spills, which pays only on tiles with registers to spare.
DKDV_DIAGONAL = {(64, 128): "unrolled", (64, 64): "unrolled"}
# diagonal: None = DKDV_DIAGONAL's choice, else forced; dkdv_ws: V2's Gluon dK/dV kernel where it applies;
# dq_ws: the Gluon dQ kernel (V1 and V2) where it applies, V2's only from dq_ws_v2_min_len keys on;
# dkdv_pairs_together: the Triton dK/dV grid's launch order (dkdv_launch_order), a number or "auto"
# (pairs_together)
OPTIONS = {"tma": True, "diagonal": None, "dkdv_ws": True, "dq_ws": True, "dq_ws_v2_min_len": 4096,
           "dkdv_pairs_together": "auto"}


def blocks(kernel, D, DV, dtype, shared_k):
    if (kernel, D, DV, dtype.itemsize) in OVERRIDES:  # before the interpreter's: tests set other tiles too
        return OVERRIDES[(kernel, D, DV, dtype.itemsize)]
    if INTERPRETED:  # the norm pass walks 2 blocks a program, so the loop is tested
        return (16, 2, 4, 2) if kernel == "norm_delta" else (16, 1, 4, 1) if kernel == "delta" else (16, 16, 4, 1)
    # the deltas' passes: (rows per block, blocks per program, warps, load stages)
    if kernel == "delta":
        return 64, 1, 4, 1
    if kernel == "norm_delta":  # about seven (rows, DV) float32 tiles live: 16 values a thread each; d w's
        return max(1, 2048 // DV), 8, 4, 3  # cross-warp sum once per 8 blocks, loads prefetched (v6d)
    if dtype.itemsize == 4:
        return {"fwd": (32, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 32, 4, 1)}[kernel]
    if (kernel, D, DV) in TUNED:
        return TUNED[(kernel, D, DV)]
    if kernel == "fwd":
        return (128, 64, 8, 3) if 2 * DV <= 256 else (64, 32, 8, 2)
    if kernel == "dkdv":
        return (64, 128, 8, 2) if DV + (1 if shared_k else 2) * D <= 256 else (32, 128, 8, 2)
    return (64, 64, 4, 2) if 2 * D <= 128 else (64, 32, 8, 2)  # dq


def dkdv_diagonal(D, DV, dtype):
    """Where the dK/dV kernel walks its diagonal query blocks: OPTIONS' forced choice, else
    DKDV_DIAGONAL's for 16-bit inputs, else "first"."""
    return OPTIONS["diagonal"] or (DKDV_DIAGONAL.get((D, DV), "first") if dtype.itemsize == 2 else "first")


def _use_tma(*ts):
    """Tensor descriptors need sm_90+, a 16-byte aligned base and 16-byte multiples for every stride
    but the last; other inputs take the pointer path of the same kernels."""
    if not OPTIONS["tma"] or INTERPRETED or not ts[0].is_cuda:
        return False
    if torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    if not all(map(tma_aligned, ts)):
        return False
    # kernels that build tensor descriptors need global scratch for them; Triton keeps the allocator
    # in a context variable, so it is set on every call (autograd runs the backward in its own thread)
    triton.set_allocator(_descriptor_scratch)
    return True


def tma_aligned(t):
    """Whether a tensor descriptor can address t: 16-byte aligned base, unit last stride, every
    other stride a multiple of 16 bytes. The base is read from the storage offset (CUDA's
    allocations are 256-byte aligned), which torch.compile's fake tensors have and data_ptr not."""
    return (t.storage_offset() * t.element_size() % 16 == 0 and t.stride(-1) == 1
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


def _descriptor_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


# Gluon's API moves between Triton releases (3.9 renamed gl.thread_barrier to gl.barrier), so the
# Gluon kernel runs only on the release it was checked and timed on (the device machine's)
GLUON_TRITON = "3.6."


def _gluon_takes(capability, *ts):
    """Whether the Gluon kernels (paired_softmax_ws.py) can run on these tensors: sm_90 with
    Triton 3.6, bf16, every tensor's heads side by side in a row and addressable by TMA."""
    if capability != (9, 0) or INTERPRETED or not triton.__version__.startswith(GLUON_TRITON):
        return False
    return all(t.dtype == torch.bfloat16 and t.stride(2) == t.shape[3] and tma_aligned(t) for t in ts)


def dkdv_ws_applies(q, k, v, do, shared_k, capability):
    """Whether V2's warp-specialized Gluon dK/dV kernel takes these inputs: V2 at head_dim 64."""
    return (OPTIONS["dkdv_ws"] and shared_k and all(t.shape[3] == 64 for t in (q, k, v, do))
            and _gluon_takes(capability, q, k, v, do))


def dq_ws_applies(q, k, v, do, capability):
    """Whether the warp-specialized Gluon dQ kernel takes these inputs: V1 or V2 at head_dim 64
    (V 128 or 64 wide); V2 from OPTIONS["dq_ws_v2_min_len"] keys on (below it the Triton dQ is
    faster: run 33, docs/kernels.md)."""
    long_enough = v.shape[3] == 128 or q.shape[1] >= OPTIONS["dq_ws_v2_min_len"]
    return (OPTIONS["dq_ws"] and q.shape[3] == k.shape[3] == 64 and v.shape[3] in (64, 128) and long_enough
            and _gluon_takes(capability, q, k, v, do))


@torch.library.custom_op("diffattn::paired_dkdv_ws", mutates_args=())
def paired_dkdv_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam_rows: torch.Tensor,
                   lse: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gluon dK/dV kernel as an opaque op: Inductor re-emits a traced kernel's source as Triton,
    which a Gluon kernel is not, so this one launch stays a call into Python (none under CUDA graphs)."""
    from . import paired_softmax_ws

    triton.set_allocator(_descriptor_scratch)  # the kernel builds its tensor descriptors in global scratch
    return paired_softmax_ws.dkdv(do, q, k, v, lam_rows, lse, delta)


@paired_dkdv_ws.register_fake
def _(do, q, k, v, lam_rows, lse, delta):
    return k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("diffattn::paired_dq_ws", mutates_args=())
def paired_dq_ws(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam_rows: torch.Tensor,
                 lse: torch.Tensor, delta: torch.Tensor, k_step: int) -> torch.Tensor:
    """The Gluon dQ kernel as an opaque op (as paired_dkdv_ws)."""
    from . import paired_softmax_ws

    triton.set_allocator(_descriptor_scratch)
    return paired_softmax_ws.dq(do, q, k, v, lam_rows, lse, delta, k_step)


@paired_dq_ws.register_fake
def _(do, q, k, v, lam_rows, lse, delta, k_step):
    return q.new_empty(q.shape)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 dots in full precision, never tf32


def unit_last_stride(t):
    """t itself when its last stride is 1 (the kernels read every other stride as given), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def forward(q, k, v, lam_rows, k_step, shared_k, norm=None):
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
    bm, bn, warps, stages = blocks("fwd", D, DV, q.dtype, shared_k)
    slices = FWD_SLICES.get((D, DV, q.dtype.itemsize), 1)
    sm_scale = 1.0 / math.sqrt(D)
    fused_norm = norm is not None and slices == 1
    y = torch.empty_like(out) if fused_norm else out
    weight, eps = norm if norm is not None else (out, 0.0)
    wrap_triton(paired_attention_fwd)[(B * H, triton.cdiv(L, bm) * slices)](
        q, k, v, lam_rows, out, o2, lse, y, weight, *_strides(q, k, v), *lam_rows.stride(), *out.stride()[:3],
        L, H, H // G, sm_scale * LOG2E, eps, D=D, DV=DV // slices, K_STEP=k_step, SHARED_K=shared_k,
        BLOCK_M=bm, BLOCK_N=bn, PREC=_precision(q.dtype), TMA=_use_tma(k, v), NORM=fused_norm, num_warps=warps,
        num_stages=stages)
    if norm is None:
        return out, o2, lse
    if not fused_norm:  # column slices: no program holds a whole row
        y = rms_norm(out, weight, eps)
    return out, o2, lse, y


# dK/dV launch order: group pairs only where at least this many pairs' rows fit half the L2
PAIRS_TOGETHER_MIN = 8


def pairs_together(pairs, pair_bytes, l2_bytes):
    """How many of `pairs` (batch, kv head) pairs the dK/dV grid runs heaviest block first together
    (dkdv_launch_order): the most that divide `pairs` evenly and have their Q and dO rows
    (pair_bytes), which each of a pair's key blocks streams, fit in half the L2; 1 (the grid's
    order) where fewer than PAIRS_TOGETHER_MIN fit. OPTIONS may fix the number. Measured on the
    H200 (docs/kernels.md, runs 28-30): a short last group starts its heaviest blocks in the last
    wave again (30 of the step's 64 pairs: +3%; 16: -5%); where 2-4 pairs fit (L >= 8k) grouping
    ran V1 d64 and V2 d128 up to 4% slower; sweep 10 (every pair at once) ran slower at 8k."""
    if OPTIONS["dkdv_pairs_together"] != "auto":
        return int(OPTIONS["dkdv_pairs_together"])
    fit = min(pairs, l2_bytes // 2 // pair_bytes)
    if fit < min(pairs, PAIRS_TOGETHER_MIN):
        return 1
    return next(p for p in range(fit, 0, -1) if pairs % p == 0)


def triton_dkdv(do, q, k, v, lam_rows, lse, delta, k_step, shared_k):
    """dK, dV (contiguous) by the Triton kernel, from the forward's LSE and the deltas; inputs as
    backward has them (unit last stride)."""
    B, L, H2, D = q.shape
    H, G, D, DV = int(H2) // 2, int(v.shape[2]), int(D), int(v.shape[3])
    dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    sm_scale = 1.0 / math.sqrt(D)
    # V1's lambda is one scalar (a zero-stride view): its -lam factor of dS2 leaves the dK/dV loop
    scalar_lam = not shared_k and all(st == 0 for st in lam_rows.stride())
    bm, bn, warps, stages = blocks("dkdv", D, DV, q.dtype, shared_k)
    l2_bytes = torch.cuda.get_device_properties(q.device).L2_cache_size if q.is_cuda else 0
    together = pairs_together(B * G, L * (H // G) * (2 * D + DV) * q.element_size(), l2_bytes)
    wrap_triton(paired_attention_bwd_dkdv)[(triton.cdiv(L, bn), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, *_strides(q, k, v, do), *lam_rows.stride(), *_strides(dk, dv),
        L, H, H // G, sm_scale * LOG2E, sm_scale, D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k,
        PREC=_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, SCALAR_LAM=scalar_lam,
        DIAGONAL=dkdv_diagonal(D, DV, q.dtype), GRADS_LIKE_INPUTS=dk.stride() == k.stride() and dv.stride() == v.stride(),
        PAIRS_TOGETHER=together, num_warps=warps, num_stages=stages)
    return dk, dv


def triton_dq(do, q, k, v, lam_rows, lse, delta, k_step, shared_k):
    """dQ (contiguous) by the Triton kernel; arguments as triton_dkdv's."""
    B, L, H2, D = q.shape
    H, G, D, DV = int(H2) // 2, int(v.shape[2]), int(D), int(v.shape[3])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sm_scale = 1.0 / math.sqrt(D)
    bm, bn, warps, stages = blocks("dq", D, DV, q.dtype, shared_k)
    wrap_triton(paired_attention_bwd_dq)[(B * H, triton.cdiv(L, bm))](
        q, k, v, do, lam_rows, lse, delta, dq, *_strides(q, k, v, do), *lam_rows.stride(), *_strides(dq), L, H,
        H // G, sm_scale * LOG2E, sm_scale, D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k, PREC=_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, TMA=_use_tma(k, v), num_warps=warps, num_stages=stages)
    return dq


def backward(do, q, k, v, lam_rows, out, o2, lse, k_step, shared_k, norm=None):
    """-> dq, dk, dv (contiguous, the inputs' shapes) and delta (B,H,2,L): [..., 1, :] is rowsum(dO * o2).
    With norm = (weight, eps), do is the gradient of forward's y, and d weight (float32) comes last."""
    B, L, H2, D = q.shape
    H, D, DV = int(H2) // 2, int(D), int(v.shape[3])  # static, as in forward
    # inputs are read with their strides (v is a slice of the fused projection: no copy of it); the
    # gradients are written contiguous
    q, k, v, do = map(unit_last_stride, (q, k, v, do))
    delta = torch.empty_like(lse)
    weight, eps = norm if norm is not None else (out, 0.0)
    bm, steps, warps, stages = blocks("delta" if norm is None else "norm_delta", D, DV, q.dtype, shared_k)
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
    if dkdv_ws_applies(q, k, v, do, shared_k, capability):
        dk, dv = paired_dkdv_ws(do, q, k, v, lam_rows, lse, delta)
    else:
        dk, dv = triton_dkdv(do, q, k, v, lam_rows, lse, delta, k_step, shared_k)
    if dq_ws_applies(q, k, v, do, capability):
        dq = paired_dq_ws(do, q, k, v, lam_rows, lse, delta, k_step)
    else:
        dq = triton_dq(do, q, k, v, lam_rows, lse, delta, k_step, shared_k)
    if norm is None:
        return dq, dk, dv, delta
    return dq, dk, dv, delta, dw_part.sum(0)
