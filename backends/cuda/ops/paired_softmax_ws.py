"""DIFF V2's dK/dV kernel for Hopper (sm_90), warp-specialized in Gluon (Triton's explicit-layout
dialect): the structure cuDNN's backward has and Triton's own pipeliner does not give
(docs/kernels.md, "What the counters say" and "try gluon-ws dK/dV"). On an H200 it takes 24-30%
less time than paired_softmax's Triton dK/dV kernel, with bitwise-equal results.

A program owns 128 keys of one kv head. A producer warp loads their K/V once, then streams each
query block's q1, q2 and dO by TMA into a ring of STAGES buffers. Two consumer warpgroups of 64
keys each compute, per query block,
    S1 = q1 k^T, S2 = q2 k^T, dP = dO V^T                    (queries on the tiles' rows)
    P = P1 - lam P2,  dS1 = P1 (dP - delta1),  dS2 = -lam P2 (dP - delta2)
    dV += P^T dO,  dK += dS1^T q1 + dS2^T q2                 (P, dS through shared memory)
and release the buffer with an mbarrier arrive; no CTA-wide barrier joins the two, so one's
exponentials run under the other's MMAs. Queries sit on the rows because each per-query value
(LSE, delta, lambda) is then 2 registers a thread; keys on rows it is 16, and that form spilled.

Same contract as paired_softmax.paired_attention_bwd_dkdv for V2 (K_STEP 1, SHARED_K), for what
paired_softmax.dkdv_ws_applies accepts: bf16, head_dim 64, every head's columns side by side in a
row (one 2-D TMA descriptor a tensor and batch addresses each head as a column block). V1 (two
key heads, V 2d wide) in this form holds 128 accumulator registers a thread and spilled: 18-21%
slower than the Triton kernel (docs/kernels.md), so V1 keeps that one.
"""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

BLOCK = gl.constexpr(64)  # head_dim; queries a streamed block; keys a consumer warpgroup (an MMA's M)
STAGES = 3  # the stream's ring; with it the kernel holds 152 KB of shared memory
LOG2E = 1.4426950408889634


@gluon.jit
def _producer(bufs, bars, descs, scalars, STAGES: gl.constexpr, BQ: gl.constexpr, K_STEP: gl.constexpr):
    """K/V of the program's 128 keys once (K_STEP key heads), then q1, q2, dO of every query block
    of BQ rows that sees them, for every output head of the group, through the ring."""
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    q_desc, k_desc, v_desc, do_desc = descs
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    D: gl.constexpr = q_desc.block_type.shape[1]
    DV: gl.constexpr = v_desc.block_type.shape[1]
    mbarrier.expect(kv_bar, 2 * K_STEP * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):  # each consumer's 64 keys
        for j in gl.static_range(K_STEP):
            tma.async_copy_global_to_shared(k_desc, [n0 + w * BLOCK, (K_STEP * g + j) * D], kv_bar,
                                            k_s.index(K_STEP * w + j))
        tma.async_copy_global_to_shared(v_desc, [n0 + w * BLOCK, g * DV], kv_bar, v_s.index(w))
    t = 0
    for r in range(GROUP):
        i = g * GROUP + r
        for qb in range(qb0, nq):
            slot = t % STAGES
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)  # fresh barriers pass at phase 1
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [qb * BQ, (2 * i) * D], bar, q1_s.index(slot))
            tma.async_copy_global_to_shared(q_desc, [qb * BQ, (2 * i + 1) * D], bar, q2_s.index(slot))
            tma.async_copy_global_to_shared(do_desc, [qb * BQ, i * DV], bar, do_s.index(slot))
            t += 1


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
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1, k.permute((1, 0)), zero, use_acc=False, is_async=True)
    s2 = warpgroup_mma(q2, k.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do, v.permute((1, 0)), zero, use_acc=False, is_async=True)
    s1 = warpgroup_mma_wait(2, deps=(s1, ))
    p1 = gl.exp2(s1 * qk_scale - lse1[:, None])
    s2 = warpgroup_mma_wait(1, deps=(s2, ))
    p2 = gl.exp2(s2 * qk_scale - lse2[:, None])
    if MASK:
        visible = offs_q[:, None] >= offs_k[None, :]
        p1 = gl.where(visible, p1, 0.0)
        p2 = gl.where(visible, p2, 0.0)
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
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a buffer

    bufs = (k_s, v_s, q1_s, q2_s, do_s, t_s)
    bars = (kv_bar, ready, empty)
    descs = (q_desc, k_desc, v_desc, do_desc)
    scalars = (n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh)
    out = (LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale)
    gl.warp_specialize([
        (_consumer, (bufs, bars, descs, scalars, out, 0, STAGES, S_LAYOUT, O_LAYOUT)),
        (_consumer, (bufs, bars, descs, scalars, out, 1, STAGES, S_LAYOUT, O_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, STAGES, BLOCK, 1)),
    ], [4, 1], [CONSUMER_REGS, 24])  # the default partition is the first consumer; producer: 1 warp


@gluon.jit
def _block_v1(k1, k2, v, dk1, dk2, dv, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base, delta_base, lam, L,
              qk_scale, BQ: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr,
              V_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """V1: one block of BQ queries against this warpgroup's 64 keys, keys on the tiles' rows (as
    the Triton kernel is tiled): three 64 x BQ score tiles, and P, dS fed to the dV and dK
    products from registers."""
    slot = t % STAGES
    col: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
    offs_q = qb * BQ + gl.arange(0, BQ, layout=col)
    q_ok = offs_q < L
    lse1 = gl.load(lse_base + offs_q, mask=q_ok, other=float("inf"))  # rows past L: probabilities 0
    lse2 = gl.load(lse_base + L + offs_q, mask=q_ok, other=float("inf"))
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    q1, q2, do = q1_s.index(slot), q2_s.index(slot), do_s.index(slot)
    zero = gl.zeros([BLOCK, BQ], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(k1, q1.permute((1, 0)), zero, use_acc=False, is_async=True)  # (keys, d) x (d, queries)
    s2 = warpgroup_mma(k2, q2.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(v, do.permute((1, 0)), zero, use_acc=False, is_async=True)  # (keys, 2d) x (2d, queries)
    s1 = warpgroup_mma_wait(2, deps=(s1, ))
    p1 = gl.exp2(s1 * qk_scale - lse1[None, :])
    s2 = warpgroup_mma_wait(1, deps=(s2, ))
    p2 = gl.exp2(s2 * qk_scale - lse2[None, :])
    if MASK:
        visible = offs_q[None, :] >= offs_k[:, None]
        p1 = gl.where(visible, p1, 0.0)
        p2 = gl.where(visible, p2, 0.0)
    pt = gl.convert_layout((p1 - lam * p2).to(gl.bfloat16), gl.DotOperandLayout(0, V_LAYOUT, 2))
    dv = warpgroup_mma(pt, do, dv, is_async=True)  # (keys, queries) x (queries, 2d)
    delta1 = gl.load(delta_base + offs_q, mask=q_ok, other=0.0)
    delta2 = gl.load(delta_base + L + offs_q, mask=q_ok, other=0.0)
    dp = warpgroup_mma_wait(1, deps=(dp, ))
    ds1 = gl.convert_layout((p1 * (dp - delta1[None, :])).to(gl.bfloat16), gl.DotOperandLayout(0, K_LAYOUT, 2))
    dk1 = warpgroup_mma(ds1, q1, dk1, is_async=True)  # (keys, queries) x (queries, d)
    ds2 = gl.convert_layout((p2 * (dp - delta2[None, :])).to(gl.bfloat16), gl.DotOperandLayout(0, K_LAYOUT, 2))
    dk2 = warpgroup_mma(ds2, q2, dk2, is_async=True)  # -lam scales dK2 once at the end
    dv, dk1, dk2 = warpgroup_mma_wait(0, deps=(dv, dk1, dk2))
    mbarrier.arrive(empty.index(slot), count=1)  # this warpgroup is done with the buffers
    return dk1, dk2, dv


@gluon.jit
def _consumer_v1(bufs, bars, descs, scalars, out, WG: gl.constexpr, BQ: gl.constexpr, STAGES: gl.constexpr,
                 S_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr):
    """V1's warpgroup WG: its 64 keys against every query block of BQ rows from its diagonal on (the
    first 64 / BQ masked), for every head of the group, then dK1, dK2, dV stored. The stream starts
    at the program's first key, so warpgroup 1 releases the blocks before its keys unread."""
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale = out
    DIAG: gl.constexpr = BLOCK // BQ  # query blocks that cross a warpgroup's 64 keys
    offs_k = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, S_LAYOUT))  # keys: rows
    dk1 = gl.zeros([BLOCK, BLOCK], gl.float32, layout=K_LAYOUT)
    dk2 = gl.zeros([BLOCK, BLOCK], gl.float32, layout=K_LAYOUT)
    dv = gl.zeros([BLOCK, 2 * BLOCK], gl.float32, layout=V_LAYOUT)
    k1, k2, v = k_s.index(2 * WG), k_s.index(2 * WG + 1), v_s.index(WG)
    lam = gl.load(LAM + b * slb).to(gl.float32)  # one scalar (zero strides)
    mbarrier.wait(kv_bar, 0)
    t = 0
    for r in range(GROUP):
        i = g * GROUP + r
        lse_base = LSE + (b * H + i) * 2 * L
        delta_base = DELTA + (b * H + i) * 2 * L
        first = qb0 + WG * DIAG  # this warpgroup's first query block
        for qb in range(qb0, gl.minimum(first, nq)):
            mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
            mbarrier.arrive(empty.index(t % STAGES), count=1)
            t += 1
        for qb in range(first, gl.minimum(first + DIAG, nq)):
            dk1, dk2, dv = _block_v1(k1, k2, v, dk1, dk2, dv, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base,
                                     delta_base, lam, L, qk_scale, BQ, STAGES, S_LAYOUT, K_LAYOUT, V_LAYOUT, True)
            t += 1
        for qb in range(first + DIAG, nq):
            dk1, dk2, dv = _block_v1(k1, k2, v, dk1, dk2, dv, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base,
                                     delta_base, lam, L, qk_scale, BQ, STAGES, S_LAYOUT, K_LAYOUT, V_LAYOUT, False)
            t += 1
    keys = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, K_LAYOUT))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, K_LAYOUT))
    ok = (keys < L)[:, None]
    dk_ptrs = DK + b * sgkb + (2 * g) * sgkh + keys[:, None] * sgkl + cols[None, :]
    gl.store(dk_ptrs, (dk1 * sm_scale).to(gl.bfloat16), mask=ok)
    gl.store(dk_ptrs + sgkh, (dk2 * (-lam * sm_scale)).to(gl.bfloat16), mask=ok)
    keys = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, V_LAYOUT))
    cols = gl.arange(0, 2 * BLOCK, layout=gl.SliceLayout(0, V_LAYOUT))
    gl.store(DV_ + b * sgvb + g * sgvh + keys[:, None] * sgvl + cols[None, :], dv.to(gl.bfloat16),
             mask=(keys < L)[:, None])


@gluon.jit
def paired_attention_bwd_dkdv_ws_v1(Q, K, V, DO, LAM, LSE, DELTA, DK, DV_,
                                    sqb, sql, skb, skl, svb, svl, sdb, sdl, slb, sll, slh,
                                    sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, L, H, GROUP, qk_scale, sm_scale,
                                    BQ: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                    SMEM_Q: gl.constexpr, SMEM_DO: gl.constexpr, SMEM_K: gl.constexpr,
                                    SMEM_V: gl.constexpr, S_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr,
                                    V_LAYOUT: gl.constexpr):
    """DIFF V1's dK/dV (two key heads per kv head, V 2d wide, scalar lambda), warp-specialized as
    the V2 kernel is, with the Triton V1 kernel's tiling: keys on rows, BQ-row query blocks."""
    pid_n = gl.program_id(0)
    bg = gl.program_id(1)
    G = H // GROUP
    b = (bg // G).to(gl.int64)
    g = bg % G
    n0 = pid_n * 2 * BLOCK
    qb0 = n0 // BQ
    nq = gl.cdiv(L, BQ)
    q_desc = tma.make_tensor_descriptor(Q + b * sqb, [L, 2 * H * BLOCK], [sql, 1], [BQ, BLOCK], SMEM_Q)
    k_desc = tma.make_tensor_descriptor(K + b * skb, [L, 2 * G * BLOCK], [skl, 1], [BLOCK, BLOCK], SMEM_K)
    v_desc = tma.make_tensor_descriptor(V + b * svb, [L, G * 2 * BLOCK], [svl, 1], [BLOCK, 2 * BLOCK], SMEM_V)
    do_desc = tma.make_tensor_descriptor(DO + b * sdb, [L, H * 2 * BLOCK], [sdl, 1], [BQ, 2 * BLOCK], SMEM_DO)

    k_s = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK, BLOCK], SMEM_K)  # (warpgroup, key head)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, 2 * BLOCK], SMEM_V)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BQ, BLOCK], SMEM_Q)
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BQ, BLOCK], SMEM_Q)
    do_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BQ, 2 * BLOCK], SMEM_DO)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a buffer

    bufs = (k_s, v_s, q1_s, q2_s, do_s, None)
    bars = (kv_bar, ready, empty)
    descs = (q_desc, k_desc, v_desc, do_desc)
    scalars = (n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh)
    out = (LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale)
    gl.warp_specialize([
        (_consumer_v1, (bufs, bars, descs, scalars, out, 0, BQ, STAGES, S_LAYOUT, K_LAYOUT, V_LAYOUT)),
        (_consumer_v1, (bufs, bars, descs, scalars, out, 1, BQ, STAGES, S_LAYOUT, K_LAYOUT, V_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, STAGES, BQ, 2)),
    ], [4, 1], [CONSUMER_REGS, 24])


def _mma_layout(n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


def constexprs_v1(bq=32, stages=4, consumer_regs=240):
    smem = gl.NVMMASharedLayout.get_default_for
    return dict(BQ=bq, STAGES=stages, CONSUMER_REGS=consumer_regs, SMEM_Q=smem([bq, 64], gl.bfloat16),
                SMEM_DO=smem([bq, 128], gl.bfloat16), SMEM_K=smem([64, 64], gl.bfloat16),
                SMEM_V=smem([64, 128], gl.bfloat16), S_LAYOUT=_mma_layout(bq), K_LAYOUT=_mma_layout(64),
                V_LAYOUT=_mma_layout(128))


def constexprs(stages=STAGES, consumer_regs=240):
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    return dict(STAGES=stages, CONSUMER_REGS=consumer_regs, S_LAYOUT=mma, O_LAYOUT=mma,
                SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.bfloat16))


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


def dkdv_v1(do, q, k, v, lam_rows, lse, delta, bq=32, stages=4):
    """-> dk, dv (contiguous) of V1 (lam_rows: the scalar lambda as a zero-stride view)."""
    B, L, H2, D = q.shape
    H, G = H2 // 2, v.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    paired_attention_bwd_dkdv_ws_v1[(triton.cdiv(L, 2 * BLOCK), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), *lam_rows.stride(), dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), L, H, H // G, LOG2E / math.sqrt(D),
        1.0 / math.sqrt(D), **constexprs_v1(bq, stages), num_warps=4, maxnreg=168)
    return dk, dv
