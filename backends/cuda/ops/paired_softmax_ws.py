"""The dK/dV kernel of paired_softmax.py for Hopper (sm_90), warp-specialized in Gluon (Triton's
explicit-layout dialect): the structure cuDNN's backward has and Triton's own pipeliner does not
give (docs/kernels.md, "What the counters say" and "try gluon-ws dK/dV").

A program owns 128 keys of one kv head. A producer warp loads their K/V once, then streams each
query block's q1, q2 and dO by TMA into a ring of STAGES buffers. Two consumer warpgroups of 64
keys each compute, per query block,
    S1 = q1 k1^T, S2 = q2 k2^T, dP = dO V^T                  (queries on the tiles' rows)
    P = P1 - lam P2,  dS1 = P1 (dP - delta1),  dS2 = -lam P2 (dP - delta2)
    dV += P^T dO,  dK1 += dS1^T q1,  dK2 += dS2^T q2          (P, dS through shared memory)
and release the buffer with an mbarrier arrive; no CTA-wide barrier joins the two, so one's
exponentials run under the other's MMAs. Queries sit on the rows because each per-query value
(LSE, delta, lambda) is then 2 registers a thread; keys on rows it is 16, and that form spilled.
V2 (SHARED_K): k1 = k2, one dK. V1: two key heads and a scalar lambda, whose factor -lam leaves
dS2 and scales dK2 once at the end, as in the Triton kernel.

Same contract as paired_softmax.paired_attention_bwd_dkdv, for what `supported` accepts: bf16,
head_dim 64 (V 64 or 128 wide), every head's columns side by side in a row (one 2-D TMA descriptor
a tensor and batch addresses every head as a column block). This module imports Gluon, so
paired_softmax imports it only on a GPU it runs on.
"""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

BLOCK = gl.constexpr(64)  # queries a streamed block; keys a consumer warpgroup (a warpgroup MMA's M)
STAGES = 3  # the stream's ring: V1 208 KB of shared memory in all, V2 152 KB
LOG2E = 1.4426950408889634


@gluon.jit
def _producer(bufs, bars, descs, scalars, D: gl.constexpr, DV: gl.constexpr, K_STEP: gl.constexpr,
              STAGES: gl.constexpr):
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    q_desc, k_desc, v_desc, do_desc = descs
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    mbarrier.expect(kv_bar, 2 * K_STEP * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):  # each consumer's 64 keys
        for j in gl.static_range(K_STEP):  # V1: both key heads of the pair
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
            tma.async_copy_global_to_shared(q_desc, [qb * BLOCK, (2 * i) * D], bar, q1_s.index(slot))
            tma.async_copy_global_to_shared(q_desc, [qb * BLOCK, (2 * i + 1) * D], bar, q2_s.index(slot))
            tma.async_copy_global_to_shared(do_desc, [qb * BLOCK, i * DV], bar, do_s.index(slot))
            t += 1


@gluon.jit
def _block_joint(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base,
                 delta_base, lam_base, sll, L, qk_scale, SHARED_K: gl.constexpr, STAGES: gl.constexpr,
                 S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """One query block's contribution to this warpgroup's 64 keys, both maps' scores and dP issued
    together, then the buffer's release. V1's lambda (zero stride) leaves dS2 and scales dK2 at the end."""
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
    p_s.store((p1 - lam[:, None] * p2).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()  # the warpgroup's MMA reads every thread's part of the tile
    dv = warpgroup_mma(p_s.permute((1, 0)), do, dv, is_async=True)  # (keys, queries) x (queries, DV)
    dp = warpgroup_mma_wait(1, deps=(dp, ))
    ds1_s.store((p1 * (dp - delta1[:, None])).to(gl.bfloat16))
    if SHARED_K:
        ds2_s.store((-lam[:, None] * p2 * (dp - delta2[:, None])).to(gl.bfloat16))
    else:
        ds2_s.store((p2 * (dp - delta2[:, None])).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    dk1 = warpgroup_mma(ds1_s.permute((1, 0)), q1, dk1, is_async=True)
    if SHARED_K:
        dk1 = warpgroup_mma(ds2_s.permute((1, 0)), q2, dk1, is_async=True)
        dv, dk1 = warpgroup_mma_wait(0, deps=(dv, dk1))  # P and dS tiles free for the next block
    else:
        dk2 = warpgroup_mma(ds2_s.permute((1, 0)), q2, dk2, is_async=True)
        dv, dk1, dk2 = warpgroup_mma_wait(0, deps=(dv, dk1, dk2))
    mbarrier.arrive(empty.index(slot), count=1)  # this warpgroup is done with the buffers
    return dk1, dk2, dv


@gluon.jit
def _block_v1(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base,
              delta_base, lam, L, qk_scale, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """V1's block (two key heads, scalar lambda; dV 2d wide). V2's order would hold both maps'
    probabilities and dP (96 registers a thread) over 128 of accumulators, and spilled; here map 1
    is finished (dS1 stored, P1 kept as bf16: 16 registers) before map 2's scores are issued.
    P = bf16(P1) - lam P2 therefore rounds P1 once more than the Triton kernel does."""
    slot = t % STAGES
    row: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    offs_q = qb * BLOCK + gl.arange(0, BLOCK, layout=row)
    q_ok = offs_q < L
    lse1 = gl.load(lse_base + offs_q, mask=q_ok, other=float("inf"))  # rows past L: probabilities 0
    delta1 = gl.load(delta_base + offs_q, mask=q_ok, other=0.0)
    mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
    q1, q2, do = q1_s.index(slot), q2_s.index(slot), do_s.index(slot)
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1, k1.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do, v.permute((1, 0)), zero, use_acc=False, is_async=True)
    s1 = warpgroup_mma_wait(1, deps=(s1, ))
    p1 = gl.exp2(s1 * qk_scale - lse1[:, None])
    if MASK:
        visible = offs_q[:, None] >= offs_k[None, :]
        p1 = gl.where(visible, p1, 0.0)
    dp = warpgroup_mma_wait(0, deps=(dp, ))
    ds1_s.store((p1 * (dp - delta1[:, None])).to(gl.bfloat16))
    p1 = p1.to(gl.bfloat16)
    fence_async_shared()
    gl.thread_barrier()  # the warpgroup's MMA reads every thread's part of the tile
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)  # made again: kept, it holds 32 registers
    s2 = warpgroup_mma(q2, k2.permute((1, 0)), zero, use_acc=False, is_async=True)
    dk1 = warpgroup_mma(ds1_s.permute((1, 0)), q1, dk1, is_async=True)  # (keys, queries) x (queries, D)
    lse2 = gl.load(lse_base + L + offs_q, mask=q_ok, other=float("inf"))
    delta2 = gl.load(delta_base + L + offs_q, mask=q_ok, other=0.0)
    s2 = warpgroup_mma_wait(1, deps=(s2, ))
    p2 = gl.exp2(s2 * qk_scale - lse2[:, None])
    if MASK:
        p2 = gl.where(visible, p2, 0.0)
    ds2_s.store((p2 * (dp - delta2[:, None])).to(gl.bfloat16))  # -lam scales dK2 at the end
    p_s.store((p1.to(gl.float32) - lam * p2).to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    dk2 = warpgroup_mma(ds2_s.permute((1, 0)), q2, dk2, is_async=True)
    dv = warpgroup_mma(p_s.permute((1, 0)), do, dv, is_async=True)
    dv, dk1, dk2 = warpgroup_mma_wait(0, deps=(dv, dk1, dk2))  # P and dS tiles free for the next block
    mbarrier.arrive(empty.index(slot), count=1)  # this warpgroup is done with the buffers
    return dk1, dk2, dv


@gluon.jit
def _step(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base,
          delta_base, lam_base, sll, L, qk_scale, SHARED_K: gl.constexpr, SPLIT_MAPS: gl.constexpr,
          STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    if SPLIT_MAPS:
        dk1, dk2, dv = _block_v1(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb,
                                 offs_k, lse_base, delta_base, gl.load(lam_base).to(gl.float32), L, qk_scale, STAGES,
                                 S_LAYOUT, MASK)
    else:
        dk1, dk2, dv = _block_joint(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t,
                                    qb, offs_k, lse_base, delta_base, lam_base, sll, L, qk_scale, SHARED_K, STAGES,
                                    S_LAYOUT, MASK)
    return dk1, dk2, dv


@gluon.jit
def _consumer(bufs, bars, descs, scalars, out, WG: gl.constexpr, D: gl.constexpr, DV: gl.constexpr,
              K_STEP: gl.constexpr, SPLIT_MAPS: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
              K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr):
    """Warpgroup WG's 64 keys: query blocks from its diagonal (masked) to L, for every head of the
    group, then its dK, dV stored. Warpgroup 1's keys start a block later, so it releases the
    stream's first block of each head unread."""
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    n0, qb0, nq, g, GROUP, b, H, L, LAM, slb, sll, slh = scalars
    LSE, DELTA, DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, qk_scale, sm_scale = out
    SHARED_K: gl.constexpr = K_STEP == 1
    offs_k = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))  # keys: columns
    p_s, ds1_s, ds2_s = t_s.index(3 * WG), t_s.index(3 * WG + 1), t_s.index(3 * WG + 2)
    dk1 = gl.zeros([BLOCK, D], gl.float32, layout=K_LAYOUT)
    dk2 = gl.zeros([BLOCK, D], gl.float32, layout=K_LAYOUT)
    dv = gl.zeros([BLOCK, DV], gl.float32, layout=V_LAYOUT)
    k1, k2, v = k_s.index(K_STEP * WG), k_s.index(K_STEP * WG + K_STEP - 1), v_s.index(WG)
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
            dk1, dk2, dv = _step(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, first,
                                 offs_k, lse_base, delta_base, lam_base, sll, L, qk_scale, SHARED_K, SPLIT_MAPS, STAGES,
                                 S_LAYOUT, True)
            t += 1
        for qb in range(first + 1, nq):
            dk1, dk2, dv = _step(k1, k2, v, dk1, dk2, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb,
                                 offs_k, lse_base, delta_base, lam_base, sll, L, qk_scale, SHARED_K, SPLIT_MAPS, STAGES,
                                 S_LAYOUT, False)
            t += 1

    keys = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, K_LAYOUT))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, K_LAYOUT))
    dk_ptrs = DK + b * sgkb + (K_STEP * g) * sgkh + keys[:, None] * sgkl + cols[None, :]
    gl.store(dk_ptrs, (dk1 * sm_scale).to(gl.bfloat16), mask=(keys < L)[:, None])
    if not SHARED_K:
        dk2 = dk2 * -gl.load(LAM + b * slb + (g * GROUP) * slh).to(gl.float32)
        gl.store(dk_ptrs + sgkh, (dk2 * sm_scale).to(gl.bfloat16), mask=(keys < L)[:, None])
    keys = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, V_LAYOUT))
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, V_LAYOUT))
    gl.store(DV_ + b * sgvb + g * sgvh + keys[:, None] * sgvl + cols[None, :], dv.to(gl.bfloat16),
             mask=(keys < L)[:, None])


@gluon.jit
def paired_attention_bwd_dkdv_ws(Q, K, V, DO, LAM, LSE, DELTA, DK, DV_,
                                 sqb, sql, skb, skl, svb, svl, sdb, sdl, slb, sll, slh,
                                 sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, L, H, GROUP, qk_scale, sm_scale,
                                 D: gl.constexpr, DV: gl.constexpr, K_STEP: gl.constexpr,
                                 SPLIT_MAPS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                 SMEM: gl.constexpr, SMEM_V: gl.constexpr, S_LAYOUT: gl.constexpr,
                                 K_LAYOUT: gl.constexpr, V_LAYOUT: gl.constexpr):
    pid_n = gl.program_id(0)
    bg = gl.program_id(1)
    G = H // GROUP
    b = (bg // G).to(gl.int64)
    g = bg % G
    n0 = pid_n * 2 * BLOCK
    qb0 = n0 // BLOCK
    nq = gl.cdiv(L, BLOCK)
    # one 2-D descriptor a tensor and batch: rows are positions, each head a column block
    q_desc = tma.make_tensor_descriptor(Q + b * sqb, [L, 2 * H * D], [sql, 1], [BLOCK, D], SMEM)
    k_desc = tma.make_tensor_descriptor(K + b * skb, [L, K_STEP * G * D], [skl, 1], [BLOCK, D], SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb, [L, G * DV], [svl, 1], [BLOCK, DV], SMEM_V)
    do_desc = tma.make_tensor_descriptor(DO + b * sdb, [L, H * DV], [sdl, 1], [BLOCK, DV], SMEM_V)

    k_s = gl.allocate_shared_memory(gl.bfloat16, [2 * K_STEP, BLOCK, D], SMEM)  # (warpgroup, key head)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, DV], SMEM_V)
    q1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], SMEM)
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], SMEM)
    do_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, DV], SMEM_V)
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
        (_consumer, (bufs, bars, descs, scalars, out, 0, D, DV, K_STEP, SPLIT_MAPS, STAGES, S_LAYOUT, K_LAYOUT,
                     V_LAYOUT)),
        (_consumer, (bufs, bars, descs, scalars, out, 1, D, DV, K_STEP, SPLIT_MAPS, STAGES, S_LAYOUT, K_LAYOUT,
                     V_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, D, DV, K_STEP, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


def _mma_layout(n):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


def constexprs(D, DV, shared_k, stages=STAGES, consumer_regs=240, split_maps=False):
    return dict(D=D, DV=DV, K_STEP=1 if shared_k else 2, SPLIT_MAPS=split_maps and not shared_k, STAGES=stages,
                CONSUMER_REGS=consumer_regs, SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK, D], gl.bfloat16),
                SMEM_V=gl.NVMMASharedLayout.get_default_for([BLOCK, DV], gl.bfloat16),
                S_LAYOUT=_mma_layout(BLOCK), K_LAYOUT=_mma_layout(D), V_LAYOUT=_mma_layout(DV))


def supported(q, k, v, do, shared_k):
    """Whether this kernel can take the dK/dV of these inputs: sm_90, bf16, head_dim 64 with V 64
    (V2) or 128 (V1) wide, each tensor's heads side by side in a row and TMA-addressable."""
    if not (q.is_cuda and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return False
    return layout_supported(q, k, v, do, shared_k)


def layout_supported(q, k, v, do, shared_k):
    D, DV = q.shape[3], v.shape[3]
    if D != 64 or DV != (64 if shared_k else 128):
        return False
    return all(t.dtype == torch.bfloat16 and t.stride(3) == 1 and t.stride(2) == t.shape[3]
               and t.storage_offset() % 8 == 0 and all(s % 8 == 0 for s in t.stride()[:2])
               for t in (q, k, v, do))


def dkdv(do, q, k, v, lam_rows, lse, delta, shared_k, stages=STAGES, split_maps=False):
    """-> dk, dv (contiguous). lse, delta (B, H, 2, L) float32 contiguous, from the forward and the
    delta pass; lam_rows (B, L, H), V1's a zero-stride view of its scalar."""
    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    dk, dv = torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype,
                                                                               device=v.device)
    paired_attention_bwd_dkdv_ws[(triton.cdiv(L, 2 * BLOCK), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), *lam_rows.stride(), dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), L, H, H // G, LOG2E / math.sqrt(D),
        1.0 / math.sqrt(D), **constexprs(D, DV, shared_k, stages, split_maps=split_maps), num_warps=4, maxnreg=168)
    return dk, dv
