"""The paired-softmax forward in Gluon (Triton's explicit-layout dialect), software-pipelined as
FA3 does within one warpgroup: the next key block's scores are issued before the previous block's
P V, and the softmax waits only for the scores (wgmma groups retire in order), so its exponentials
run while the P V MMAs do. Triton's own pipeliner waits for every outstanding MMA before any
softmax (docs/kernels.md), which is why this exists. One warpgroup per program (64 query rows,
64 keys a block); K/V blocks arrive by TMA into a ring of STAGES buffers.

Same contract as paired_softmax.paired_attention_fwd without NORM: out, o2, lse (base 2)."""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _issue_kv(k1_desc, k2_desc, v_desc, bars, k1_s, k2_s, v_s, block, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              SHARED_K: gl.constexpr):
    slot = block % STAGES
    bar = bars.index(slot)
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
def _store_p(p_s, p1, p2, block):
    """P of `block` into its half of the double buffer, made visible to the MMAs (async proxy) of
    every warp: P V reads it from shared memory. Writing it before waiting for the previous P V is
    what keeps ptxas from moving that wait above the softmax (docs/kernels.md, try gluon)."""
    buf = (block % 2) * 2
    p_s.index(buf).store(p1.to(gl.bfloat16))
    p_s.index(buf + 1).store(p2.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _step(q1_s, q2_s, k1_s, k2_s, v_s, p_s, bars, k1_desc, k2_desc, v_desc, m1, l1, m2, l2, acc1, acc2, block, n,
          offs_m, qk_scale, BLOCK: gl.constexpr, STAGES: gl.constexpr, SHARED_K: gl.constexpr,
          S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """Scores of `block`, P V of the block before it, then the softmax of `block` while P V runs."""
    slot = block % STAGES
    prev = (block - 1) % STAGES
    prev_p = ((block - 1) % 2) * 2
    mbarrier.wait(bars.index(slot), (block // STAGES) & 1)
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1_s, k1_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    s2 = warpgroup_mma(q2_s, k2_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
    acc1 = warpgroup_mma(p_s.index(prev_p), v_s.index(prev), acc1, is_async=True)
    acc2 = warpgroup_mma(p_s.index(prev_p + 1), v_s.index(prev), acc2, is_async=True)
    s1 = warpgroup_mma_wait(3, deps=(s1, ))  # groups retire in order: the scores first
    s2 = warpgroup_mma_wait(2, deps=(s2, ))
    p1, alpha1, m1, l1 = _softmax(s1, m1, l1, qk_scale, offs_m, block * BLOCK, BLOCK, S_LAYOUT, MASK)
    p2, alpha2, m2, l2 = _softmax(s2, m2, l2, qk_scale, offs_m, block * BLOCK, BLOCK, S_LAYOUT, MASK)
    _store_p(p_s, p1, p2, block)
    acc1 = warpgroup_mma_wait(1, deps=(acc1, ))
    acc2 = warpgroup_mma_wait(0, deps=(acc2, ))
    if block + STAGES - 1 < n:  # the previous block's buffers are free: fetch the block STAGES - 1 ahead
        _issue_kv(k1_desc, k2_desc, v_desc, bars, k1_s, k2_s, v_s, block + STAGES - 1, BLOCK, STAGES, SHARED_K)
    row_o: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    acc1 = acc1 * gl.convert_layout(alpha1, row_o)[:, None]
    acc2 = acc2 * gl.convert_layout(alpha2, row_o)[:, None]
    return m1, l1, m2, l2, acc1, acc2


@gluon.jit
def paired_attention_fwd_gluon(Q, K, V, LAM, OUT, O2, LSE,
                               sqb, sql, sqh, skb, skl, skh, svb, svl, svh, slb, sll, slh, sob, sol, soh,
                               L, H, GROUP, qk_scale,
                               D: gl.constexpr, DV: gl.constexpr, K_STEP: gl.constexpr, SHARED_K: gl.constexpr,
                               BLOCK: gl.constexpr, STAGES: gl.constexpr, QK_SMEM: gl.constexpr,
                               V_SMEM: gl.constexpr, P_SMEM: gl.constexpr, S_LAYOUT: gl.constexpr,
                               O_LAYOUT: gl.constexpr):
    pid_m = gl.num_programs(1) - 1 - gl.program_id(1)  # the longest rows first
    bh = gl.program_id(0)
    b = (bh // H).to(gl.int64)
    i = bh % H
    g = i // GROUP
    start_m = pid_m * BLOCK
    n = pid_m + 1  # key blocks, the last one on the diagonal

    q_base = Q + b * sqb + (2 * i) * sqh
    q1_desc = tma.make_tensor_descriptor(q_base, [L, D], [sql, 1], [BLOCK, D], QK_SMEM)
    q2_desc = tma.make_tensor_descriptor(q_base + sqh, [L, D], [sql, 1], [BLOCK, D], QK_SMEM)
    k1_base = K + b * skb + (g * K_STEP) * skh
    k1_desc = tma.make_tensor_descriptor(k1_base, [L, D], [skl, 1], [BLOCK, D], QK_SMEM)
    k2_desc = tma.make_tensor_descriptor(k1_base + skh, [L, D], [skl, 1], [BLOCK, D], QK_SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb + g * svh, [L, DV], [svl, 1], [BLOCK, DV], V_SMEM)

    q1_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK, D], QK_SMEM)
    q2_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK, D], QK_SMEM)
    k1_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], QK_SMEM)
    if SHARED_K:
        k2_s = k1_s
    else:
        k2_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, D], QK_SMEM)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK, DV], V_SMEM)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK, BLOCK], P_SMEM)  # (block parity, map)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    mbarrier.init(q_bar, count=1)

    mbarrier.expect(q_bar, 2 * q1_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q1_desc, [start_m, 0], q_bar, q1_s)
    tma.async_copy_global_to_shared(q2_desc, [start_m, 0], q_bar, q2_s)
    for s in gl.static_range(STAGES):
        if s < n:
            _issue_kv(k1_desc, k2_desc, v_desc, bars, k1_s, k2_s, v_s, s, BLOCK, STAGES, SHARED_K)

    row_s: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    offs_m = start_m + gl.arange(0, BLOCK, layout=row_s)
    m1 = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
    m2 = gl.full([BLOCK], float("-inf"), gl.float32, layout=row_s)
    l1 = gl.zeros([BLOCK], gl.float32, layout=row_s)
    l2 = gl.zeros([BLOCK], gl.float32, layout=row_s)
    acc1 = gl.zeros([BLOCK, DV], gl.float32, layout=O_LAYOUT)
    acc2 = gl.zeros([BLOCK, DV], gl.float32, layout=O_LAYOUT)

    # block 0 (masked: it is the diagonal when n = 1, and masking a visible block changes nothing)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(bars.index(0), 0)
    zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=S_LAYOUT)
    s1 = warpgroup_mma(q1_s, k1_s.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    s2 = warpgroup_mma(q2_s, k2_s.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    s1 = warpgroup_mma_wait(1, deps=(s1, ))
    s2 = warpgroup_mma_wait(0, deps=(s2, ))
    p1, alpha1, m1, l1 = _softmax(s1, m1, l1, qk_scale, offs_m, 0, BLOCK, S_LAYOUT, True)
    p2, alpha2, m2, l2 = _softmax(s2, m2, l2, qk_scale, offs_m, 0, BLOCK, S_LAYOUT, True)
    _store_p(p_s, p1, p2, 0)

    for block in range(1, n - 1):  # fully visible blocks
        m1, l1, m2, l2, acc1, acc2 = _step(q1_s, q2_s, k1_s, k2_s, v_s, p_s, bars, k1_desc, k2_desc, v_desc, m1, l1, m2,
                                           l2, acc1, acc2, block, n, offs_m, qk_scale, BLOCK, STAGES, SHARED_K,
                                           S_LAYOUT, O_LAYOUT, False)
    for block in range(n - 1 + (n == 1).to(gl.int32), n):  # the diagonal block, when it is not block 0
        m1, l1, m2, l2, acc1, acc2 = _step(q1_s, q2_s, k1_s, k2_s, v_s, p_s, bars, k1_desc, k2_desc, v_desc, m1, l1, m2,
                                           l2, acc1, acc2, block, n, offs_m, qk_scale, BLOCK, STAGES, SHARED_K,
                                           S_LAYOUT, O_LAYOUT, True)
    last = (n - 1) % STAGES
    last_p = ((n - 1) % 2) * 2
    acc1 = warpgroup_mma(p_s.index(last_p), v_s.index(last), acc1, is_async=True)
    acc2 = warpgroup_mma(p_s.index(last_p + 1), v_s.index(last), acc2, is_async=True)
    acc1 = warpgroup_mma_wait(1, deps=(acc1, ))
    acc2 = warpgroup_mma_wait(0, deps=(acc2, ))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    mbarrier.invalidate(q_bar)

    row_o: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    offs_mo = start_m + gl.arange(0, BLOCK, layout=row_o)
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


def layouts(D, DV, block):
    """The constexpr layouts of one warpgroup's tiles: shared (TMA / wgmma operands, P), and the
    scores' and outputs' MMA accumulators."""
    s_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block, 16])
    o_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, 16])
    return dict(QK_SMEM=gl.NVMMASharedLayout.get_default_for([block, D], gl.bfloat16),
                V_SMEM=gl.NVMMASharedLayout.get_default_for([block, DV], gl.bfloat16),
                P_SMEM=gl.NVMMASharedLayout.get_default_for([block, block], gl.bfloat16),
                S_LAYOUT=s_layout, O_LAYOUT=o_layout)


def forward(q, k, v, lam_rows, k_step, shared_k, block=64, stages=2):
    """bf16 only; the caller checks TMA alignment (paired_softmax.tma_aligned) and sets the allocator."""
    import math
    import torch
    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    out = torch.empty(B, L, H, DV, dtype=q.dtype, device=q.device)
    o2 = torch.empty_like(out)
    lse = torch.empty(B, H, 2, L, dtype=torch.float32, device=q.device)
    strides = [s for t in (q, k, v) for s in t.stride()[:3]]
    paired_attention_fwd_gluon[(B * H, triton.cdiv(L, block))](
        q, k, v, lam_rows, out, o2, lse, *strides, *lam_rows.stride(), *out.stride()[:3], L, H, H // G,
        1.4426950408889634 / math.sqrt(D), D=D, DV=DV, K_STEP=k_step, SHARED_K=shared_k, BLOCK=block, STAGES=stages,
        **layouts(D, DV, block), num_warps=4)
    return out, o2, lse
