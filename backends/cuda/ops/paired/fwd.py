"""The paired-softmax forward kernel (Triton): both maps' online softmax in one pass over K/V.

One pass over the K/V tiles with both maps' online softmax side by side, so each V tile is loaded
once for both maps; the lambda combine happens in the epilogue (and, for DIFF V1, the subln RMSNorm
of the output rows, NORM). Saved for the backward: the combined output, map 2's output o2 (map 1's
is out + lam * o2) and each map's log-sum-exp (base 2, scale folded in). No L x L tensor is stored.
Causal: blocks left of the diagonal run unmasked, the diagonal blocks masked.
"""
import triton
import triton.language as tl

from .loads import _kv_block, _kv_sources, _query_rows, _query_tiles


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

