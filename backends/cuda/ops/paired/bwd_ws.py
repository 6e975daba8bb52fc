"""Backward kernels for Hopper (sm_90), warp-specialized in Gluon (Triton's explicit-layout
dialect): the producer / consumer structure cuDNN's backward has and Triton's own pipeliner does
not give. DIFF V2's dK/dV kernel takes a quarter less time on an H200 than the Triton one
(bwd.paired_attention_bwd_dkdv), with bitwise-equal results; the dQ kernel (V1 and V2, below) has
the same producer / two-consumer form with queries fixed per program and key blocks streamed.

dK/dV: a program owns 128 keys of one kv head. A producer warp loads their K/V once, then streams each
query block's q1, q2 and dO by TMA into a ring of STAGES buffers. Two consumer warpgroups of 64
keys each compute, per query block,
    S1 = q1 k^T, S2 = q2 k^T, dP = dO V^T                    (queries on the tiles' rows)
    P = P1 - lam P2,  dS1 = P1 (dP - delta1),  dS2 = -lam P2 (dP - delta2)
    dV += P^T dO,  dK += dS1^T q1 + dS2^T q2                 (P, dS through shared memory)
and release the buffer with an mbarrier arrive; no CTA-wide barrier joins the two, so one's
exponentials run under the other's MMAs. Queries sit on the rows because each per-query value
(LSE, delta, lambda) is then 2 registers a thread; keys on rows it is 16, and that form spilled.

Same contract as bwd.paired_attention_bwd_dkdv for V2 (K_STEP 1, SHARED_K), for what
launch.dkdv_ws_applies accepts: bf16, head_dim 64, every head's columns side by side in a row (one
2-D TMA descriptor a tensor and batch addresses each head as a column block), and Triton 3.6,
whose Gluon API this is written against (triton_runtime.gluon_available). V1 (two key heads,
V 2d wide) keeps the Triton dK/dV kernel: in this form its 128 accumulator registers a thread
spill (about a fifth slower), and with keys on rows and 32-query blocks it left the training step
unchanged (docs/kernels-log.md).
"""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from ..triton_runtime import LOG2E

BLOCK = gl.constexpr(64)  # head_dim; queries a streamed block; keys a consumer warpgroup (an MMA's M)
STAGES = 3  # the stream's ring; with it the kernel holds 152 KB of shared memory
# the tiles' layouts, built once here rather than on every launch
MMA_LAYOUT = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
SMEM_LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.bfloat16)
SMEM_V_LAYOUTS = {dv: gl.NVMMASharedLayout.get_default_for([BLOCK, dv], gl.bfloat16) for dv in (64, 128)}  # dQ's v, dO


@gluon.jit
def _barriers(STAGES: gl.constexpr):
    """A once-loaded operands' barrier, and the stream ring's ready (the producer's copies landed)
    and empty (both consumer warpgroups released the buffer) barriers."""
    once = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    return once, ready, empty


@gluon.jit
def _producer(bufs, bars, descs, scalars, STAGES: gl.constexpr):
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    q_desc, k_desc, v_desc, do_desc = descs
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):  # each consumer's 64 keys
        tma.async_copy_global_to_shared(k_desc, [n0 + w * BLOCK, g * BLOCK], kv_bar, k_s.index(w))
        tma.async_copy_global_to_shared(v_desc, [n0 + w * BLOCK, g * BLOCK], kv_bar, v_s.index(w))
    t = 0
    for r in range(GROUP):
        i = g * GROUP + r
        for qb in range(qb0, nq):
            slot = t % STAGES
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)  # fresh barriers pass at phase 1
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [qb * BLOCK, (2 * i) * BLOCK], bar, q1_s.index(slot))
            tma.async_copy_global_to_shared(q_desc, [qb * BLOCK, (2 * i + 1) * BLOCK], bar, q2_s.index(slot))
            tma.async_copy_global_to_shared(do_desc, [qb * BLOCK, i * BLOCK], bar, do_s.index(slot))
            t += 1


@gluon.jit
def _scores(q1, q2, do, k1, k2, v, lse1, lse2, offs_q, offs_k, qk_scale, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """Both maps' probabilities P_m = exp2(q_m k_m^T scale - lse_m) of a (queries, keys) tile (masked
    causally on a diagonal tile), and dP = dO v^T still in flight: each exponential issues under
    the MMAs after it."""
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1, k1.permute((1, 0)), zero, use_acc=False, is_async=True)
    s2 = warpgroup_mma(q2, k2.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do, v.permute((1, 0)), zero, use_acc=False, is_async=True)
    s1 = warpgroup_mma_wait(2, deps=(s1, ))
    p1 = gl.exp2(s1 * qk_scale - lse1[:, None])
    s2 = warpgroup_mma_wait(1, deps=(s2, ))
    p2 = gl.exp2(s2 * qk_scale - lse2[:, None])
    if MASK:
        visible = offs_q[:, None] >= offs_k[None, :]
        p1 = gl.where(visible, p1, 0.0)
        p2 = gl.where(visible, p2, 0.0)
    return p1, p2, dp


@gluon.jit
def _block(k, v, dk, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base, delta_base,
           lam_base, sll, L, qk_scale, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """One query block's contribution to this warpgroup's 64 keys, then the buffer's release."""
    slot = t % STAGES
    row: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    offs_q = qb * BLOCK + gl.arange(0, BLOCK, layout=row)
    q_ok = offs_q < L
    lse1 = gl.load(lse_base + offs_q, mask=q_ok, other=float("inf"))  # rows past L: probabilities 0
    lse2 = gl.load(lse_base + L + offs_q, mask=q_ok, other=float("inf"))
    delta1 = gl.load(delta_base + offs_q, mask=q_ok, other=0.0)
    delta2 = gl.load(delta_base + L + offs_q, mask=q_ok, other=0.0)
    lam = gl.load(lam_base + offs_q * sll, mask=q_ok, other=0.0).to(gl.float32)
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    q1, q2, do = q1_s.index(slot), q2_s.index(slot), do_s.index(slot)
    p1, p2, dp = _scores(q1, q2, do, k, k, v, lse1, lse2, offs_q, offs_k, qk_scale, S_LAYOUT, MASK)
    p_s.store((p1 - lam[:, None] * p2).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()  # the warpgroup's MMA reads every thread's part of the tile
    dv = warpgroup_mma(p_s.permute((1, 0)), do, dv, is_async=True)  # (keys, queries) x (queries, d)
    dp = warpgroup_mma_wait(1, deps=(dp, ))
    ds1_s.store((p1 * (dp - delta1[:, None])).to(gl.bfloat16))
    ds2_s.store((-lam[:, None] * p2 * (dp - delta2[:, None])).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    dk = warpgroup_mma(ds1_s.permute((1, 0)), q1, dk, is_async=True)
    dk = warpgroup_mma(ds2_s.permute((1, 0)), q2, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))  # P and dS tiles free for the next block
    mbarrier.arrive(empty.index(slot), count=1)  # this warpgroup is done with the buffers
    return dk, dv


@gluon.jit
def _consumer(bufs, bars, descs, scalars, out, WG: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
              O_LAYOUT: gl.constexpr):
    """Warpgroup WG's 64 keys: query blocks from its diagonal (masked) to L, for every head of the
    group, then its dK, dV stored. Warpgroup 1's keys start a block later, so it releases the
    stream's first block of each head unread."""
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale = out
    offs_k = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))  # keys: columns
    p_s, ds1_s, ds2_s = t_s.index(3 * WG), t_s.index(3 * WG + 1), t_s.index(3 * WG + 2)
    dk = gl.zeros([BLOCK, BLOCK], gl.float32, layout=O_LAYOUT)
    dv = gl.zeros([BLOCK, BLOCK], gl.float32, layout=O_LAYOUT)
    k, v = k_s.index(WG), v_s.index(WG)
    mbarrier.wait(kv_bar, 0)
    t = 0
    for r in range(GROUP):
        i = g * GROUP + r
        lse_base = LSE + (b * H + i) * 2 * L
        delta_base = DELTA + (b * H + i) * 2 * L
        lam_base = LAM + b * slb + i * slh
        first = qb0 + WG  # this warpgroup's diagonal block
        if WG == 1:
            if qb0 < nq:
                mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
                mbarrier.arrive(empty.index(t % STAGES), count=1)
                t += 1
        if first < nq:
            dk, dv = _block(k, v, dk, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, first, offs_k,
                            lse_base, delta_base, lam_base, sll, L, qk_scale, STAGES, S_LAYOUT, True)
            t += 1
        for qb in range(first + 1, nq):
            dk, dv = _block(k, v, dk, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k,
                            lse_base, delta_base, lam_base, sll, L, qk_scale, STAGES, S_LAYOUT, False)
            t += 1
    keys = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, O_LAYOUT))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, O_LAYOUT))
    ok = (keys < L)[:, None]
    gl.store(DK + b * sgkb + g * sgkh + keys[:, None] * sgkl + cols[None, :], (dk * sm_scale).to(gl.bfloat16), mask=ok)
    gl.store(DV_ + b * sgvb + g * sgvh + keys[:, None] * sgvl + cols[None, :], dv.to(gl.bfloat16), mask=ok)


@gluon.jit
def paired_attention_bwd_dkdv_ws(Q, K, V, DO, LAM, LSE, DELTA, DK, DV_,
                                 sqb, sql, skb, skl, svb, svl, sdb, sdl, slb, sll, slh,
                                 sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, L, H, GROUP, qk_scale, sm_scale,
                                 STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, SMEM: gl.constexpr,
                                 S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    pid_n = gl.program_id(0)
    bg = gl.program_id(1)
    G = H // GROUP
    b = (bg // G).to(gl.int64)
    g = bg % G
    n0 = pid_n * 2 * BLOCK
    qb0 = n0 // BLOCK
    nq = gl.cdiv(L, BLOCK)
    # one 2-D descriptor a tensor and batch: rows are positions, each head a column block
    q_desc = tma.make_tensor_descriptor(Q + b * sqb, [L, 2 * H * BLOCK], [sql, 1], [BLOCK, BLOCK], SMEM)
    k_desc = tma.make_tensor_descriptor(K + b * skb, [L, G * BLOCK], [skl, 1], [BLOCK, BLOCK], SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb, [L, G * BLOCK], [svl, 1], [BLOCK, BLOCK], SMEM)
    do_desc = tma.make_tensor_descriptor(DO + b * sdb, [L, H * BLOCK], [sdl, 1], [BLOCK, BLOCK], SMEM)

    k_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, BLOCK], SMEM)  # one tile a warpgroup
    v_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, BLOCK], SMEM)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, BLOCK], SMEM)
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, BLOCK], SMEM)
    do_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, BLOCK], SMEM)
    t_s = gl.allocate_shared_memory(gl.bfloat16, [6, BLOCK, BLOCK], SMEM)  # per warpgroup: P, dS1, dS2
    kv_bar, ready, empty = _barriers(STAGES)

    bufs = (k_s, v_s, q1_s, q2_s, do_s, t_s)
    bars = (kv_bar, ready, empty)
    descs = (q_desc, k_desc, v_desc, do_desc)
    scalars = (n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh)
    out = (LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale)
    gl.warp_specialize([
        (_consumer, (bufs, bars, descs, scalars, out, 0, STAGES, S_LAYOUT, O_LAYOUT)),
        (_consumer, (bufs, bars, descs, scalars, out, 1, STAGES, S_LAYOUT, O_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])  # the default partition is the first consumer; producer: 1 warp


def constexprs(stages=STAGES, consumer_regs=240):
    return dict(STAGES=stages, CONSUMER_REGS=consumer_regs, S_LAYOUT=MMA_LAYOUT, O_LAYOUT=MMA_LAYOUT,
                SMEM=SMEM_LAYOUT)


def dkdv(do, q, k, v, lam_rows, lse, delta, stages=STAGES):
    """-> dk, dv (contiguous) of V2. lse, delta (B, H, 2, L) float32 contiguous, from the forward
    and the delta pass; lam_rows (B, L, H). The caller has set Triton's allocator (the kernel builds
    its tensor descriptors in global scratch)."""
    B, L, H2, D = q.shape
    H, G = H2 // 2, v.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    paired_attention_bwd_dkdv_ws[(triton.cdiv(L, 2 * BLOCK), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), *lam_rows.stride(), dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), L, H, H // G, LOG2E / math.sqrt(D),
        1.0 / math.sqrt(D), **constexprs(stages), num_warps=4, maxnreg=168)
    return dk, dv


# ---- dQ (V1 and V2) ------------------------------------------------------------------------------


@gluon.jit
def _dq_producer(bufs, bars, descs, scalars, DV: gl.constexpr, K_STEP: gl.constexpr, STAGES: gl.constexpr):
    q1_s, q2_s, do_s, k1_s, k2_s, v_s = bufs
    q_bar, ready, empty = bars
    q_desc, k_desc, v_desc, do_desc = descs
    m0, nk, i, g = scalars
    mbarrier.expect(q_bar, 4 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for w in gl.static_range(2):  # each consumer's 64 queries, loaded once
        tma.async_copy_global_to_shared(q_desc, [m0 + w * BLOCK, (2 * i) * BLOCK], q_bar, q1_s.index(w))
        tma.async_copy_global_to_shared(q_desc, [m0 + w * BLOCK, (2 * i + 1) * BLOCK], q_bar, q2_s.index(w))
        tma.async_copy_global_to_shared(do_desc, [m0 + w * BLOCK, i * DV], q_bar, do_s.index(w))
    for kb in range(nk):
        slot = kb % STAGES
        mbarrier.wait(empty.index(slot), ((kb // STAGES) & 1) ^ 1)  # fresh barriers pass at phase 1
        bar = ready.index(slot)
        mbarrier.expect(bar, K_STEP * k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kb * BLOCK, (g * K_STEP) * BLOCK], bar, k1_s.index(slot))
        if K_STEP == 2:  # V1: the second map's key head; V2 shares one
            tma.async_copy_global_to_shared(k_desc, [kb * BLOCK, (g * K_STEP + 1) * BLOCK], bar, k2_s.index(slot))
        tma.async_copy_global_to_shared(v_desc, [kb * BLOCK, g * DV], bar, v_s.index(slot))


@gluon.jit
def _dq_block(q1, q2, do, dq1, dq2, k1_s, k2_s, v_s, ready, empty, kb, lse1, lse2, delta1, delta2, offs_q,
              qk_scale, K_STEP: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """One key block's contribution to this warpgroup's dQ1, dQ2, then the buffer's release."""
    slot = kb % STAGES
    mbarrier.wait(ready.index(slot), (kb // STAGES) & 1)
    k1, v = k1_s.index(slot), v_s.index(slot)
    if K_STEP == 2:
        k2 = k2_s.index(slot)
    else:
        k2 = k1
    offs_k = kb * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))
    p1, p2, dp = _scores(q1, q2, do, k1, k2, v, lse1, lse2, offs_q, offs_k, qk_scale, S_LAYOUT, MASK)
    dp = warpgroup_mma_wait(0, deps=(dp, ))
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
    # dS straight from registers into the MMA (no shared-memory round trip); -lam scales dQ2 at the end
    ds1 = gl.convert_layout((p1 * (dp - delta1[:, None])).to(gl.bfloat16), a_layout)
    ds2 = gl.convert_layout((p2 * (dp - delta2[:, None])).to(gl.bfloat16), a_layout)
    dq1 = warpgroup_mma(ds1, k1, dq1, is_async=True)  # (queries, keys) x (keys, d)
    dq2 = warpgroup_mma(ds2, k2, dq2, is_async=True)
    dq1, dq2 = warpgroup_mma_wait(0, deps=(dq1, dq2))  # done with this block's K
    mbarrier.arrive(empty.index(slot), count=1)
    return dq1, dq2


@gluon.jit
def _dq_consumer(bufs, bars, scalars, out, WG: gl.constexpr, K_STEP: gl.constexpr, STAGES: gl.constexpr,
                 S_LAYOUT: gl.constexpr):
    """Warpgroup WG's 64 queries: key blocks left of its diagonal, then the diagonal (masked); a
    block past it (warpgroup 0's last) is released unread. Then dQ1, dQ2 stored."""
    q1_s, q2_s, do_s, k1_s, k2_s, v_s = bufs
    q_bar, ready, empty = bars
    m0, nk, i, b, H, L, LAM, slb, sll, slh = scalars
    LSE, DELTA, DQ, sgqb, sgql, sgqh, qk_scale, sm_scale = out
    row: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    offs_q = m0 + WG * BLOCK + gl.arange(0, BLOCK, layout=row)
    q_ok = offs_q < L
    lse_base = LSE + (b * H + i) * 2 * L
    delta_base = DELTA + (b * H + i) * 2 * L
    lse1 = gl.load(lse_base + offs_q, mask=q_ok, other=float("inf"))  # rows past L: probabilities 0
    lse2 = gl.load(lse_base + L + offs_q, mask=q_ok, other=float("inf"))
    delta1 = gl.load(delta_base + offs_q, mask=q_ok, other=0.0)
    delta2 = gl.load(delta_base + L + offs_q, mask=q_ok, other=0.0)
    dq1 = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    dq2 = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    q1, q2, do = q1_s.index(WG), q2_s.index(WG), do_s.index(WG)
    mbarrier.wait(q_bar, 0)
    diag = m0 // BLOCK + WG  # this warpgroup's diagonal key block
    for kb in range(0, gl.minimum(diag, nk)):
        dq1, dq2 = _dq_block(q1, q2, do, dq1, dq2, k1_s, k2_s, v_s, ready, empty, kb, lse1, lse2, delta1, delta2,
                             offs_q, qk_scale, K_STEP, STAGES, S_LAYOUT, False)
    if diag < nk:
        dq1, dq2 = _dq_block(q1, q2, do, dq1, dq2, k1_s, k2_s, v_s, ready, empty, diag, lse1, lse2, delta1,
                             delta2, offs_q, qk_scale, K_STEP, STAGES, S_LAYOUT, True)
    if WG == 0:
        if diag + 1 < nk:  # warpgroup 1's diagonal block
            mbarrier.wait(ready.index((diag + 1) % STAGES), ((diag + 1) // STAGES) & 1)
            mbarrier.arrive(empty.index((diag + 1) % STAGES), count=1)
    lam = gl.load(LAM + b * slb + offs_q * sll + i * slh, mask=q_ok, other=0.0).to(gl.float32)
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))
    ptrs = DQ + b * sgqb + (2 * i) * sgqh + offs_q[:, None] * sgql + cols[None, :]
    gl.store(ptrs, (dq1 * sm_scale).to(gl.bfloat16), mask=q_ok[:, None])
    gl.store(ptrs + sgqh, (dq2 * (-lam[:, None] * sm_scale)).to(gl.bfloat16), mask=q_ok[:, None])


@gluon.jit
def paired_attention_bwd_dq_ws(Q, K, V, DO, LAM, LSE, DELTA, DQ,
                               sqb, sql, skb, skl, svb, svl, sdb, sdl, slb, sll, slh, sgqb, sgql, sgqh,
                               L, H, GROUP, qk_scale, sm_scale,
                               DV: gl.constexpr, K_STEP: gl.constexpr, STAGES: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, SMEM: gl.constexpr, SMEM_V: gl.constexpr,
                               S_LAYOUT: gl.constexpr):
    """dQ of 128 queries of output head i (both sub-heads), for V1 (K_STEP 2: two key heads, V DV
    wide) and V2 (K_STEP 1: one key head for both maps). A producer warp loads the queries' q1, q2
    and dO once, then streams key blocks of k1 (k2) and v by TMA into a ring of STAGES buffers; two
    consumer warpgroups of 64 queries each compute per block
        S1 = q1 k1^T, S2 = q2 k2^T, dP = dO v^T, dS_m = P_m (dP - delta_m), dQ_m += dS_m k_m
    with dS from registers. Programs walk query blocks heaviest first, heads fastest, as the Triton
    dQ kernel does."""
    bh = gl.program_id(0)
    pid_m = gl.num_programs(1) - 1 - gl.program_id(1)
    b = (bh // H).to(gl.int64)
    i = bh % H
    g = i // GROUP
    G = H // GROUP
    m0 = pid_m * 2 * BLOCK
    nk = gl.minimum(gl.cdiv(L, BLOCK), m0 // BLOCK + 2)  # key blocks up to warpgroup 1's diagonal
    q_desc = tma.make_tensor_descriptor(Q + b * sqb, [L, 2 * H * BLOCK], [sql, 1], [BLOCK, BLOCK], SMEM)
    k_desc = tma.make_tensor_descriptor(K + b * skb, [L, K_STEP * G * BLOCK], [skl, 1], [BLOCK, BLOCK], SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb, [L, G * DV], [svl, 1], [BLOCK, DV], SMEM_V)
    do_desc = tma.make_tensor_descriptor(DO + b * sdb, [L, H * DV], [sdl, 1], [BLOCK, DV], SMEM_V)

    q1_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, BLOCK], SMEM)  # one tile a warpgroup
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, BLOCK], SMEM)
    do_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, DV], SMEM_V)
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, BLOCK], SMEM)
    k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES if K_STEP == 2 else 1, BLOCK, BLOCK], SMEM)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, DV], SMEM_V)
    q_bar, ready, empty = _barriers(STAGES)

    bufs = (q1_s, q2_s, do_s, k1_s, k2_s, v_s)
    bars = (q_bar, ready, empty)
    descs = (q_desc, k_desc, v_desc, do_desc)
    scalars = (m0, nk, i, b, H, L, LAM, slb, sll, slh)
    out = (LSE, DELTA, DQ, sgqb, sgql, sgqh, qk_scale, sm_scale)
    gl.warp_specialize([
        (_dq_consumer, (bufs, bars, scalars, out, 0, K_STEP, STAGES, S_LAYOUT)),
        (_dq_consumer, (bufs, bars, scalars, out, 1, K_STEP, STAGES, S_LAYOUT)),
        (_dq_producer, (bufs, bars, descs, (m0, nk, i, g), DV, K_STEP, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


def dq_constexprs(dv, k_step, stages=STAGES, consumer_regs=240):
    return dict(DV=dv, K_STEP=k_step, STAGES=stages, CONSUMER_REGS=consumer_regs, SMEM=SMEM_LAYOUT,
                SMEM_V=SMEM_V_LAYOUTS[dv], S_LAYOUT=MMA_LAYOUT)


def dq(do, q, k, v, lam_rows, lse, delta, k_step, stages=STAGES):
    """-> dq (contiguous) of V1 (k_step 2) or V2 (k_step 1); arguments as dkdv's."""
    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    paired_attention_bwd_dq_ws[(B * H, triton.cdiv(L, 2 * BLOCK))](
        q, k, v, do, lam_rows, lse, delta, dq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), *lam_rows.stride(), dq.stride(0), dq.stride(1),
        dq.stride(2), L, H, H // G, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), **dq_constexprs(DV, k_step, stages),
        num_warps=4, maxnreg=168)
    return dq
