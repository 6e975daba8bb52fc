"""Experiment (not wired into the ops): DIFF V2's dK/dV kernel warp-specialized in Gluon, the
structure cuDNN's backward has and ours lacks (docs/kernels.md, "What the counters say"): per
program 128 keys; a producer warp loads them once, then streams each query block's q1, q2 and dO by
TMA into a ring of STAGES buffers; two consumer warpgroups of 64 keys each (setmaxnreg) compute
S = Q K^T for both maps and dP = dO V^T with the queries on rows (each per-query value, LSE, delta,
lambda, is then 2 registers a thread; keys on rows it was 16, and the first form, cce9f7d, spilled),
and dV += P^T dO, dK += dS^T Q with P and dS passed transposed through shared memory; the two work
independently: no CTA-wide barrier, so one's exponentials can run under the other's MMAs.
Consumers release a buffer with an mbarrier arrive; the producer refills it once both have.

Same contract as paired_softmax.paired_attention_bwd_dkdv for V2 (one key head per pair, V d wide,
lambda per query), bf16, head_dim 64, q/k/v/dO contiguous in their last two dims (heads side by
side in a row: one 2-D descriptor a batch, each head a column block), deltas from the delta pass.

    PYTHONPATH=. python benchmarks/scripts/gluon_dkdv_ws.py compile      # sm_90 on any machine
    PYTHONPATH=. python benchmarks/scripts/gluon_dkdv_ws.py ab [--lengths 2048,8192,16384]   # GPU

`compile` prints registers, stack, the main loop's instructions per MMA work and the instruction
mix; `ab` checks dK, dV of both kernels against paired_softmax.backward's at odd lengths and
grouped heads, then alternates the two dK/dV kernels alone at B*L = 16k, 16 heads.

Status: compiled for sm_90 on the CPU box (no spills beyond 64-72 B of stack; 594 instructions a
main-loop iteration per 1536k MACs against the Triton kernel's 895); never run on a GPU.
"""
import argparse
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)


@gluon.jit
def _producer(bufs, bars, descs, scalars, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    q_desc, k_desc, v_desc, do_desc = descs
    n0, qb0, nq, g, GROUP, b, H, L, LSE, DELTA, LAM, slb, sll, slh, qk_scale = scalars
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
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
def _block(k, v, dk, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k, lse_base, delta_base,
           lam_base, sll, L, qk_scale, BLOCK: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
           O_LAYOUT: gl.constexpr, MASK: gl.constexpr):
    """One query block's contribution to this warpgroup's 64 keys (queries on the score tiles' rows,
    keys on dK's and dV's), then the buffer's release."""
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
    dv = warpgroup_mma(p_s.permute((1, 0)), do, dv, is_async=True)  # (keys, queries) x (queries, DV)
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
def _consumer(bufs, bars, descs, scalars, WG: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    """Warpgroup WG's 64 keys: query blocks from its diagonal (masked) to L, for every head of the group.
    Warpgroup 1's keys start a block later, so it releases the stream's first block of each head unread."""
    k_s, v_s, q1_s, q2_s, do_s, t_s = bufs
    kv_bar, ready, empty = bars
    n0, qb0, nq, g, GROUP, b, H, L, LSE, DELTA, LAM, slb, sll, slh, qk_scale = scalars
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
                            lse_base, delta_base, lam_base, sll, L, qk_scale, BLOCK, STAGES, S_LAYOUT, O_LAYOUT, True)
            t += 1
        for qb in range(first + 1, nq):
            dk, dv = _block(k, v, dk, dv, p_s, ds1_s, ds2_s, q1_s, q2_s, do_s, ready, empty, t, qb, offs_k,
                            lse_base, delta_base, lam_base, sll, L, qk_scale, BLOCK, STAGES, S_LAYOUT, O_LAYOUT, False)
            t += 1
    return dk, dv


@gluon.jit
def _consumer_store(bufs, bars, descs, scalars, out, WG: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
                    S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    dk, dv = _consumer(bufs, bars, descs, scalars, WG, BLOCK, STAGES, S_LAYOUT, O_LAYOUT)
    n0, qb0, nq, g, GROUP, b, H, L, LSE, DELTA, LAM, slb, sll, slh, qk_scale = scalars
    DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, sm_scale = out
    offs = n0 + WG * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, O_LAYOUT))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, O_LAYOUT))
    ok = (offs < L)[:, None]
    gl.store(DK + b * sgkb + g * sgkh + offs[:, None] * sgkl + cols[None, :], (dk * sm_scale).to(gl.bfloat16), mask=ok)
    gl.store(DV_ + b * sgvb + g * sgvh + offs[:, None] * sgvl + cols[None, :], dv.to(gl.bfloat16), mask=ok)


@gluon.jit
def paired_attention_dkdv_ws(Q, K, V, DO, LAM, LSE, DELTA, DK, DV_,
                             sqb, sql, skb, skl, svb, svl, sdb, sdl, slb, sll, slh,
                             sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, L, H, GROUP, qk_scale, sm_scale,
                             BLOCK: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                             SMEM: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr):
    pid_n = gl.program_id(0)
    bg = gl.program_id(1)
    G = H // GROUP
    b = (bg // G).to(gl.int64)
    g = bg % G
    n0 = pid_n * 2 * BLOCK
    qb0 = n0 // BLOCK
    nq = gl.cdiv(L, BLOCK)
    # one 2-D descriptor a tensor and batch: rows are positions, each head a column block of BLOCK
    q_desc = tma.make_tensor_descriptor(Q + b * sqb, [L, 2 * H * BLOCK], [sql, 1], [BLOCK, BLOCK], SMEM)
    do_desc = tma.make_tensor_descriptor(DO + b * sdb, [L, H * BLOCK], [sdl, 1], [BLOCK, BLOCK], SMEM)
    k_desc = tma.make_tensor_descriptor(K + b * skb, [L, G * BLOCK], [skl, 1], [BLOCK, BLOCK], SMEM)
    v_desc = tma.make_tensor_descriptor(V + b * svb, [L, G * BLOCK], [svl, 1], [BLOCK, BLOCK], SMEM)

    k_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK, BLOCK], SMEM)  # (warpgroup)
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
    scalars = (n0, qb0, nq, g, GROUP, b, H, L, LSE, DELTA, LAM, slb, sll, slh, qk_scale)
    out = (DK, DV_, sgkb, sgkl, sgkh, sgvb, sgvl, sgvh, sm_scale)
    gl.warp_specialize([
        (_consumer_store, (bufs, bars, descs, scalars, out, 0, BLOCK, STAGES, S_LAYOUT, O_LAYOUT)),
        (_consumer_store, (bufs, bars, descs, scalars, out, 1, BLOCK, STAGES, S_LAYOUT, O_LAYOUT)),
        (_producer, (bufs, bars, descs, scalars, BLOCK, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


BLOCK = 64


def layouts():
    return dict(SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], gl.bfloat16),
                S_LAYOUT=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16]),
                O_LAYOUT=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16]))


def dkdv(do, q, k, v, lam_rows, lse, delta, stages=3, maxnreg=168, consumer_regs=240):
    """V2's dK, dV (bf16, head_dim 64); delta from paired_softmax.backward's delta pass. The caller
    sets Triton's allocator for in-kernel descriptors (paired_softmax._use_tma does)."""
    B, L, H2, D = q.shape
    H, G = H2 // 2, k.shape[2]
    assert D == BLOCK and v.shape[3] == BLOCK and q.dtype == torch.bfloat16
    assert all(t.stride(3) == 1 and t.stride(2) == BLOCK for t in (q, k, v, do)), "heads side by side in a row"
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    paired_attention_dkdv_ws[(triton.cdiv(L, 2 * BLOCK), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), *lam_rows.stride(), dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), L, H, H // G, 1.4426950408889634 / math.sqrt(D),
        1.0 / math.sqrt(D), BLOCK=BLOCK, STAGES=stages, CONSUMER_REGS=consumer_regs, **layouts(), num_warps=4,
        maxnreg=maxnreg)
    return dk, dv


def compile_sm90(stages=3):
    """Compile for sm_90 without a GPU (Triton's own ptxas and cuobjdump): registers, stack, SASS mix."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = paired_attention_dkdv_ws
    pointers = {"Q", "K", "V", "DO", "LAM", "DK", "DV_"}
    consts = dict(BLOCK=BLOCK, STAGES=stages, CONSUMER_REGS=240, **layouts())
    sig = {n: "constexpr" if n in consts else "*bf16" if n in pointers else "*fp32" if n in ("LSE", "DELTA")
           else "fp32" if n in ("qk_scale", "sm_scale") else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32") and n not in ("H", "GROUP")}
    src = GluonASTSource(fn, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage, sass = (subprocess.run([os.path.join(tools, "cuobjdump"), flag, cubin], capture_output=True,
                                      text=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
    counts = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass))
              for op in ("HGMMA", "MUFU.EX2", "UTMALDG", "SYNCS", "LDL", "STL", "USETMAXREG", "BAR.SYNC")}
    regs = re.search(r"REG:\d+ STACK:\d+", usage).group(0)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import kernels_resources as kr  # the Triton kernels' main-loop measures, on this SASS
    print(f"stages {stages}: {regs}, shared {compiled.metadata.shared} B, main loop {kr.main_loop(sass)}, "
          f"EX2 under MMA {kr.exps_under_mma(sass)}, {counts}", flush=True)


def triton_dkdv(do, q, k, v, lam_rows, lse, delta):
    """The Triton dK/dV kernel alone, launched as paired_softmax.backward launches it for V2."""
    from diffattn.backends.cuda.ops import paired_softmax as ps

    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bm, bn, warps, stages = ps.blocks("dkdv", D, DV, q.dtype, True)
    ps.paired_attention_bwd_dkdv[(triton.cdiv(L, bn), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, *ps._strides(q, k, v, do), *lam_rows.stride(),
        *ps._strides(dk, dv), L, H, H // G, ps.LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), D=D, DV=DV, K_STEP=1,
        SHARED_K=True, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, SCALAR_LAM=False, DIAGONAL=ps.dkdv_diagonal(D, DV, q.dtype),
        GRADS_LIKE_INPUTS=True, num_warps=warps, num_stages=stages)
    return dk, dv


def ab(lengths):
    from triton.testing import do_bench

    from benchmarks._common import warm_gpu
    from diffattn.backends.cuda.ops import paired_softmax as ps

    def inputs(B, L, H, G, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        q, k, v, do = r(B, L, 2 * H, BLOCK), r(B, L, G, BLOCK), r(B, L, G, BLOCK), r(B, L, H, BLOCK)
        lam = torch.rand(B, L, H, device="cuda", generator=gen).to(torch.bfloat16)
        out, o2, lse = ps.forward(q, k, v, lam, 1, True)
        _, dk, dv, delta = ps.backward(do, q, k, v, lam, out, o2, lse, 1, True)
        return (do, q, k, v, lam, lse, delta), (dk, dv)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    warm_gpu()
    print("| B | L | H | G | dK/dV kernel | ms | TFLOP/s (6 N^2 d a head) | err dk | err dv |")
    print("|---|---|---|---|---|---|---|---|---|")
    codes = (("triton", triton_dkdv), ("gluon ws", dkdv))
    for B, L, H, G in ((3, 300, 4, 4), (2, 1000, 4, 2), (1, 64, 2, 2), (2, 100, 4, 1)):  # correctness only
        args, want = inputs(B, L, H, G)
        ps._use_tma(args[1])  # Triton's allocator for in-kernel descriptors
        for name, fn in codes:
            got = fn(*args)
            print(f"| {B} | {L} | {H} | {G} | {name} | - | - | {rel(got[0], want[0]):.1e} | {rel(got[1], want[1]):.1e} |",
                  flush=True)
    for L in lengths:
        B, H = max(1, 16384 // L), 16
        args, want = inputs(B, L, H, H)
        ps._use_tma(args[1])
        flops = 6 * B * H * L * L * BLOCK  # QK^T x2, dP, dV, dK x2 over the causal half: 6 N^2 d a head
        for rnd in range(2):
            for name, fn in codes:
                got = fn(*args)
                ms = do_bench(lambda: fn(*args), return_mode="median")
                print(f"| {B} | {L} | {H} | {H} | {name} (round {rnd + 1}) | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                      f"{rel(got[0], want[0]):.1e} | {rel(got[1], want[1]):.1e} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "ab"))
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--stages", default="2,3")
    a = ap.parse_args()
    if a.what == "compile":
        for st in map(int, a.stages.split(",")):
            compile_sm90(st)
    else:
        sys.path.insert(0, os.getcwd())
        ab([int(x) for x in a.lengths.split(",")])


if __name__ == "__main__":
    main()
