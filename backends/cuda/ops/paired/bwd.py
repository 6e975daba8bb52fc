"""The paired-softmax backward kernels (Triton): the deltas (with DIFF V1's subln backward), dK/dV, dQ.

The method of Triton's fused-attention tutorial, extended to two maps: with dO1 = dO,
dO2 = -lam dO and dP = dO V^T shared by both maps,
    delta1 = rowsum(dO * o1), delta2' = rowsum(dO * o2)            (paired_attention_bwd_delta)
    dV  += (P1 - lam P2)^T dO                                        (one matmul for both maps)
    dS1  = P1 (dP - delta1),   dS2 = -lam P2 (dP - delta2')
    dQm  = s dSm Km,   dKm = s dSm^T Qm,   d lam = -delta2' (per row; V1 sums it)
dK/dV come from a kernel that keeps one K/V block resident and walks the query blocks of every
query head of its group (no atomics); dQ from a kernel that keeps a query block resident. Rows
past L read lse = +inf, so their probabilities are exactly 0.
"""
import triton
import triton.language as tl

from .loads import _kv_block, _kv_sources, _query_rows, _query_tiles


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
    # gradients laid out as the inputs store through the loads' offsets: the main loop then compiles
    # to fewer instructions and less stack, and V2 d64 fwd+bwd ran 4-5% faster at 4k-16k than with
    # offsets from the gradients' own strides (docs/kernels-log.md, GRADS_LIKE_INPUTS)
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

