"""The paired-softmax forward, warp-specialized in Gluon as FA3 structures it: per program 128
query rows, a producer warp that streams the K/V blocks by TMA into a ring of STAGES buffers, and
two consumer warpgroups of 64 rows each that compute independently (no CTA-wide barrier between
them, so one's softmax can run under the other's MMAs). Consumers release a buffer with an
mbarrier arrive once their MMAs on it are done; the producer waits for both before refilling it.

Same contract as paired_softmax.paired_attention_fwd without NORM: out, o2, lse (base 2). bf16."""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _producer(bufs, bars, descs, scalars, WG: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              SHARED_K: gl.constexpr, DV: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    q_s, k1_s, k2_s, v_s, p_s = bufs
    q_bar, ready, empty = bars
    q1_desc, q2_desc, k1_desc, k2_desc, v_desc = descs
    start_m, n, L, H, b, i, OUT, O2, LSE, LAM, slb, sll, slh, sob, sol, soh, qk_scale = scalars
    mbarrier.expect(q_bar, 4 * q1_desc.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(q1_desc, [start_m + c * BLOCK, 0], q_bar, q_s.index(2 * c))
        tma.async_copy_global_to_shared(q2_desc, [start_m + c * BLOCK, 0], q_bar, q_s.index(2 * c + 1))
    for block in range(n):
        slot = block % STAGES
        mbarrier.wait(empty.index(slot), ((block // STAGES) & 1) ^ 1)  # fresh barriers pass at phase 1
        bar = ready.index(slot)
        if SHARED_K:
            mbarrier.expect(bar, k1_desc.block_type.nbytes + v_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, 2 * k1_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k2_desc, [block * BLOCK, 0], bar, k2_s.index(slot))
        tma.async_copy_global_to_shared(k1_desc, [block * BLOCK, 0], bar, k1_s.index(slot))
        tma.async_copy_global_to_shared(v_desc, [block * BLOCK, 0], bar, v_s.index(slot))


@gluon.jit
def _softmax(s, m, l, qk_scale, offs_m, start_n, BLOCK: gl.constexpr, S_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    if MASK:
        offs_n = start_n + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, S_LAYOUT))
        s = gl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m - m_new)
    return p, alpha, m_new, l * alpha + gl.sum(p, 1)


@gluon.jit
def _scores(q1, q2, k1_s, k2_s, slot, BLOCK: gl.constexpr, S_LAYOUT: gl.constexpr):
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1, k1_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    s2 = warpgroup_mma(q2, k2_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    return s1, s2


@gluon.jit
def _store_p(p_s, p1, p2, base):
    """P into shared memory for the P V MMA, visible to the async proxy and to all of the
    warpgroup's warps. Being written before the P V wait keeps ptxas from hoisting that wait
    above the softmax (a register P carried across the loop made it do so)."""
    p_s.index(base).store(p1.to(gl.bfloat16))
    p_s.index(base + 1).store(p2.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _pipelined(q1, q2, k1_s, k2_s, v_s, p_s, ready, empty, block, m1, l1, m2, l2, acc1, acc2, offs_m, qk_scale,
               WG: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
               O_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """Scores of block + 1, then P V of `block`; the softmax of block + 1 runs while P V does."""
    nxt = (block + 1) % STAGES
    mbarrier.wait(ready.index(nxt), ((block + 1) // STAGES) & 1)
    s1, s2 = _scores(q1, q2, k1_s, k2_s, nxt, BLOCK, S_LAYOUT)
    mine = 4 * WG + 2 * (block % 2)
    acc1 = warpgroup_mma(p_s.index(mine), v_s.index(block % STAGES), acc1, is_async=True)
    acc2 = warpgroup_mma(p_s.index(mine + 1), v_s.index(block % STAGES), acc2, is_async=True)
    s1, s2 = warpgroup_mma_wait(2, deps=(s1, s2))  # groups retire in order: the scores only
    p1, alpha1, m1, l1 = _softmax(s1, m1, l1, qk_scale, offs_m, (block + 1) * BLOCK, BLOCK, S_LAYOUT, MASK)
    p2, alpha2, m2, l2 = _softmax(s2, m2, l2, qk_scale, offs_m, (block + 1) * BLOCK, BLOCK, S_LAYOUT, MASK)
    _store_p(p_s, p1, p2, 4 * WG + 2 * ((block + 1) % 2))
    acc1, acc2 = warpgroup_mma_wait(0, deps=(acc1, acc2))
    mbarrier.arrive(empty.index(block % STAGES), count=1)  # this warpgroup is done with block's buffers
    row_o: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    acc1 = acc1 * gl.convert_layout(alpha1, row_o)[:, None]
    acc2 = acc2 * gl.convert_layout(alpha2, row_o)[:, None]
    return m1, l1, m2, l2, acc1, acc2


@gluon.jit
def _consumer(bufs, bars, descs, scalars, WG: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              SHARED_K: gl.constexpr, DV: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    """Warpgroup WG's 64 rows: key blocks 0..WG's diagonal (the last one masked), software-pipelined
    as FA3's consumers are."""
    q_s, k1_s, k2_s, v_s, p_s = bufs
    q_bar, ready, empty = bars
    start_m, n, L, H, b, i, OUT, O2, LSE, LAM, slb, sll, slh, sob, sol, soh, qk_scale = scalars
    row0 = start_m + WG * BLOCK
    n_mine = gl.minimum(row0 // BLOCK + 1, n)  # rows past L (second warpgroup) stop where the keys do
    row_s: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    offs_m = row0 + gl.arange(0, BLOCK, layout=row_s)
    m1 = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
    m2 = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
    l1 = gl.zeros([BLOCK], gl.float32, layout=row_s)
    l2 = gl.zeros([BLOCK], gl.float32, layout=row_s)
    acc1 = gl.zeros([BLOCK, DV], gl.float32, layout=O_LAYOUT)
    acc2 = gl.zeros([BLOCK, DV], gl.float32, layout=O_LAYOUT)
    q1 = q_s.index(2 * WG)
    q2 = q_s.index(2 * WG + 1)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    s1, s2 = _scores(q1, q2, k1_s, k2_s, 0, BLOCK, S_LAYOUT)
    s1, s2 = warpgroup_mma_wait(0, deps=(s1, s2))
    p1, alpha1, m1, l1 = _softmax(s1, m1, l1, qk_scale, offs_m, 0, BLOCK, S_LAYOUT, True)  # block 0 (masked:
    p2, alpha2, m2, l2 = _softmax(s2, m2, l2, qk_scale, offs_m, 0, BLOCK, S_LAYOUT, True)  # harmless if visible)
    _store_p(p_s, p1, p2, 4 * WG)
    for block in range(n_mine - 2):  # the next block fully visible
        m1, l1, m2, l2, acc1, acc2 = _pipelined(q1, q2, k1_s, k2_s, v_s, p_s, ready, empty, block, m1, l1, m2, l2,
                                                acc1, acc2, offs_m, qk_scale, WG, BLOCK, STAGES, S_LAYOUT, O_LAYOUT,
                                                False)
    for block in range(gl.maximum(n_mine - 2, 0), n_mine - 1):  # the next block is the diagonal
        m1, l1, m2, l2, acc1, acc2 = _pipelined(q1, q2, k1_s, k2_s, v_s, p_s, ready, empty, block, m1, l1, m2, l2,
                                                acc1, acc2, offs_m, qk_scale, WG, BLOCK, STAGES, S_LAYOUT, O_LAYOUT,
                                                True)
    last = n_mine - 1
    mine = 4 * WG + 2 * (last % 2)
    acc1 = warpgroup_mma(p_s.index(mine), v_s.index(last % STAGES), acc1, is_async=True)
    acc2 = warpgroup_mma(p_s.index(mine + 1), v_s.index(last % STAGES), acc2, is_async=True)
    acc1, acc2 = warpgroup_mma_wait(0, deps=(acc1, acc2))
    mbarrier.arrive(empty.index(last % STAGES), count=1)

    row_o: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    offs_mo = row0 + gl.arange(0, BLOCK, layout=row_o)
    row_ok = offs_mo < L
    o1 = acc1 / gl.convert_layout(l1, row_o)[:, None]
    o2 = acc2 / gl.convert_layout(l2, row_o)[:, None]
    lam = gl.load(LAM + b * slb + offs_mo * sll + i * slh, mask=row_ok, other=0.0).to(gl.float32)
    o_ptrs = b * sob + offs_mo[:, None] * sol + i * soh + gl.arange(0, DV, layout=gl.SliceLayout(0, O_LAYOUT))[None, :]
    gl.store(OUT + o_ptrs, (o1 - lam[:, None] * o2).to(gl.bfloat16), mask=row_ok[:, None])
    gl.store(O2 + o_ptrs, o2.to(gl.bfloat16), mask=row_ok[:, None])
    lse_base = LSE + (b * H + i) * 2 * L
    gl.store(lse_base + offs_m, m1 + gl.log2(l1), mask=offs_m < L)
    gl.store(lse_base + L + offs_m, m2 + gl.log2(l2), mask=offs_m < L)


@gluon.jit
def paired_attention_fwd_ws(Q, K, V, LAM, OUT, O2, LSE,
                            sqb, sql, sqh, skb, skl, skh, svb, svl, svh, slb, sll, slh, sob, sol, soh,
                            L, H, GROUP, qk_scale,
                            D: gl.constexpr, DV: gl.constexpr, K_STEP: gl.constexpr, SHARED_K: gl.constexpr,
                            BLOCK: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                            QK_SMEM: gl.constexpr, V_SMEM: gl.constexpr, P_SMEM: gl.constexpr, S_LAYOUT: gl.constexpr,
                            O_LAYOUT: gl.constexpr):
    pid_m = gl.num_programs(1) - 1 - gl.program_id(1)  # the longest rows first
    bh = gl.program_id(0)
    b = (bh // H).to(gl.int64)
    i = bh % H
    g = i // GROUP
    start_m = pid_m * 2 * BLOCK
    n = gl.minimum(start_m + 2 * BLOCK, gl.cdiv(L, BLOCK) * BLOCK) // BLOCK  # key blocks the program needs

    q_base = Q + b * sqb + (2 * i) * sqh
    q1_desc = tma.make_tensor_descriptor(q_base, [L, D], [sql, 1], [BLOCK, D], QK_SMEM)
    q2_desc = tma.make_tensor_descriptor(q_base + sqh, [L, D], [sql, 1], [BLOCK, D], QK_SMEM)
    k1_base = K + b * skb + (g * K_STEP) * skh
    k1_desc = tma.make_tensor_descriptor(k1_base, [L, D], [skl, 1], [BLOCK, D], QK_SMEM)
    k2_desc = tma.make_tensor_descriptor(k1_base + skh, [L, D], [skl, 1], [BLOCK, D], QK_SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb + g * svh, [L, DV], [svl, 1], [BLOCK, DV], V_SMEM)

    q_s = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK, D], QK_SMEM)  # (warpgroup, map)
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], QK_SMEM)
    if SHARED_K:
        k2_s = k1_s
    else:
        k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], QK_SMEM)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, DV], V_SMEM)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [8, BLOCK, BLOCK], P_SMEM)  # (warpgroup, block parity, map)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a buffer

    bufs = (q_s, k1_s, k2_s, v_s, p_s)
    bars = (q_bar, ready, empty)
    descs = (q1_desc, q2_desc, k1_desc, k2_desc, v_desc)
    scalars = (start_m, n, L, H, b, i, OUT, O2, LSE, LAM, slb, sll, slh, sob, sol, soh, qk_scale)
    gl.warp_specialize([
        (_consumer, (bufs, bars, descs, scalars, 0, BLOCK, STAGES, SHARED_K, DV, S_LAYOUT, O_LAYOUT)),
        (_consumer, (bufs, bars, descs, scalars, 1, BLOCK, STAGES, SHARED_K, DV, S_LAYOUT, O_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, 0, BLOCK, STAGES, SHARED_K, DV, S_LAYOUT, O_LAYOUT)),
    ], [4, 1], [CONSUMER_REGS, 24])


def layouts(D, DV, block):
    s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block, 16])
    o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    return dict(QK_SMEM=gl.NVMMASharedLayout.get_default_for([block, D], gl.bfloat16),
                V_SMEM=gl.NVMMASharedLayout.get_default_for([block, DV], gl.bfloat16),
                P_SMEM=gl.NVMMASharedLayout.get_default_for([block, block], gl.bfloat16),
                S_LAYOUT=s_layout, O_LAYOUT=o_layout)


def forward(q, k, v, lam_rows, k_step, shared_k, block=64, stages=3, maxnreg=168, consumer_regs=240):
    """bf16; the caller checks TMA alignment (paired_softmax.tma_aligned) and sets the allocator."""
    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device)
    o2 = torch.empty_like(out)
    lse = torch.empty(B, H, 2, L, dtype=torch.float32, device=q.device)
    strides = [s for t in (q, k, v) for s in t.stride()[:3]]
    paired_attention_fwd_ws[(B * H, triton.cdiv(L, 2 * block))](
        q, k, v, lam_rows, out, o2, lse, *strides, *lam_rows.stride(), *out.stride()[:3], L, H, H // G,
        1.4426950408889634 / math.sqrt(D), D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k, BLOCK=block, STAGES=stages,
        CONSUMER_REGS=consumer_regs, **layouts(D, DV, block), num_warps=4, maxnreg=maxnreg)
    return out, o2, lse
