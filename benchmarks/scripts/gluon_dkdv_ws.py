"""The Gluon warp-specialized dK/dV kernels (backends/cuda/ops/paired_softmax_ws.py) against the
Triton one (paired_softmax.paired_attention_bwd_dkdv): compiled for sm_90 on any machine, or
checked and timed on the GPU.

    PYTHONPATH=. python benchmarks/scripts/gluon_dkdv_ws.py compile [--variants v1,v2] [--stages 2,3]   # any machine
    PYTHONPATH=. python benchmarks/scripts/gluon_dkdv_ws.py ab [--variants v1,v2] [--lengths 2048,8192,16384]   # GPU

`compile` prints registers, stack, the main loop's instructions per MMA work (and its local loads
and stores: spills) and the instruction mix. `ab` checks the kernels' dK, dV against
paired_softmax.backward's with the Triton kernel at odd lengths and grouped heads, into buffers
that held NaN (a skipped store would show), then alternates the dK/dV kernels alone at
B*L = 16k, 16 heads. `--variants v1,v2` picks DIFF V1 (d 64, V 128: keys on rows, 32-query
blocks) and V2 (d 64). V1's first form (queries on rows) was measured at 1f54f4d (docs/kernels.md).
"""
import argparse
import math
import os
import sys

import torch
import triton

from diffattn.backends.cuda.ops import paired_softmax as ps
from diffattn.backends.cuda.ops import paired_softmax_ws as ws


def compile_sm90(stages=ws.STAGES, variant="v2"):
    """Compile for sm_90 without a GPU (Triton's own ptxas and cuobjdump): registers, stack, SASS mix."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    v1 = variant == "v1"
    fn = ws.paired_attention_bwd_dkdv_ws_v1 if v1 else ws.paired_attention_bwd_dkdv_ws
    consts = ws.constexprs_v1(stages=stages) if v1 else ws.constexprs(stages)
    pointers = {"Q", "K", "V", "DO", "LAM", "DK", "DV_"}
    fp32 = {"LSE", "DELTA"} | ({"LAM"} if v1 else set())  # V1's lambda: a float32 parameter
    sig = {n: "constexpr" if n in consts else "*fp32" if n in fp32 else "*bf16" if n in pointers
           else "fp32" if n in ("qk_scale", "sm_scale") else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] not in ("constexpr", "fp32") and n not in ("H", "GROUP", "sll", "slh", "slb")}
    compiled = triton.compile(GluonASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, maxnreg=168))
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
    local = sum(text.startswith(("LDL", "STL")) for text in kr._main_loop_body(sass)[1])
    print(f"{variant} stages {stages}: {regs}, shared {compiled.metadata.shared} B, main loop {kr.main_loop(sass)} "
          f"({local} local loads/stores), EX2 under MMA {kr.exps_under_mma(sass)}, {counts}", flush=True)


def inputs(variant, B, L, H, G, seed=0):
    """bf16 inputs in the projection layout (V1: two key heads per kv head, V 2d wide, one float32
    lambda; V2: one key head, lambda per row); lse and delta from paired_softmax's kernels, and the
    Triton kernel's dK, dV."""
    v1 = variant == "v1"
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    dv = 128 if v1 else 64
    q, k, v, do = r(B, L, 2 * H, 64), r(B, L, (2 if v1 else 1) * G, 64), r(B, L, G, dv), r(B, L, H, dv)
    if v1:
        lam = torch.rand((), device="cuda", generator=gen).add(0.1).expand(B, L, H)
    else:
        lam = torch.rand(B, L, H, device="cuda", generator=gen).to(torch.bfloat16)
    out, o2, lse = ps.forward(q, k, v, lam, 2 if v1 else 1, not v1)
    saved = dict(ps.OPTIONS)
    ps.OPTIONS.update(dkdv_ws=False, dkdv_ws_v1=False)
    try:
        _, dk, dv, delta = ps.backward(do, q, k, v, lam, out, o2, lse, 2 if v1 else 1, not v1)
    finally:
        ps.OPTIONS.update(saved)
    return (do, q, k, v, lam, lse, delta), (dk, dv)


def poisoned(fn, *args):
    """fn's dK, dV computed into buffers that held NaN (a skipped store would leave NaN): the
    caching allocator hands the freed NaN-filled blocks back to the kernel's torch.empty; returns
    the gradients and whether it did."""
    first = fn(*args)
    ptrs = {t.fill_(float("nan")).data_ptr() for t in first}
    del first
    got = fn(*args)
    return got, {t.data_ptr() for t in got} == ptrs


def triton_dkdv(do, q, k, v, lam_rows, lse, delta):
    """The Triton dK/dV kernel alone, launched as paired_softmax.backward launches it."""
    B, L, H2, D = q.shape
    H, G, DV = H2 // 2, v.shape[2], v.shape[3]
    shared_k = DV == D
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bm, bn, warps, stages = ps.blocks("dkdv", D, DV, q.dtype, shared_k)
    ps.paired_attention_bwd_dkdv[(triton.cdiv(L, bn), B * G)](
        q, k, v, do, lam_rows, lse, delta, dk, dv, *ps._strides(q, k, v, do), *lam_rows.stride(),
        *ps._strides(dk, dv), L, H, H // G, ps.LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), D=D, DV=DV,
        K_STEP=1 if shared_k else 2, SHARED_K=shared_k, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn,
        SCALAR_LAM=not shared_k, DIAGONAL=ps.dkdv_diagonal(D, DV, q.dtype), GRADS_LIKE_INPUTS=True,
        num_warps=warps, num_stages=stages)
    return dk, dv


def ab(variants, lengths):
    """Prints the table; returns the Gluon kernel's best time over the Triton kernel's, per
    (variant, L), for the caller's verdict."""
    from triton.testing import do_bench

    from benchmarks._common import warm_gpu

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    warm_gpu()
    print("| variant | B | L | H | G | dK/dV kernel | ms | TFLOP/s | err dk | err dv | into NaN buffers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for variant in variants:
        if variant == "v1":
            codes = [("triton", triton_dkdv)] + [
                (f"gluon ws (stages {st})", lambda *a, st=st: ws.dkdv_v1(*a, stages=st)) for st in (3, 4)]
        else:
            codes = [("triton", triton_dkdv), ("gluon ws", ws.dkdv)]
        for B, L, H, G in ((3, 300, 4, 4), (2, 1000, 4, 2), (1, 64, 2, 2), (2, 100, 4, 1), (1, 129, 2, 1)):
            args, want = inputs(variant, B, L, H, G)
            ps._use_tma(args[1])  # Triton's allocator for in-kernel descriptors
            for name, fn in codes:
                got, reused = poisoned(fn, *args)
                print(f"| {variant} | {B} | {L} | {H} | {G} | {name} | - | - | {rel(got[0], want[0]):.1e} | "
                      f"{rel(got[1], want[1]):.1e} | {'yes' if reused else 'no'} |", flush=True)
        for L in lengths:
            B, H = max(1, 16384 // L), 16
            args, want = inputs(variant, B, L, H, H)
            ps._use_tma(args[1])
            dv = args[3].shape[3]
            # per head: both maps' scores and dK (4 N^2 d), dP and dV (2 N^2 dv), over the causal half
            flops = B * H * L * L * (4 * 64 + 2 * dv)
            best = {}
            for rnd in range(2):
                for name, fn in codes:
                    got = fn(*args)
                    ms = do_bench(lambda: fn(*args), return_mode="median")
                    best[name] = min(best.get(name, ms), ms)
                    print(f"| {variant} | {B} | {L} | {H} | {H} | {name} (round {rnd + 1}) | {ms:.3f} | "
                          f"{flops / ms / 1e9:.0f} | {rel(got[0], want[0]):.1e} | {rel(got[1], want[1]):.1e} | - |",
                          flush=True)
            ratios[(variant, L)] = min(v for k, v in best.items() if k != "triton") / best["triton"]
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "ab"))
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--stages", default=str(ws.STAGES))
    ap.add_argument("--variants", default="v2")
    ap.add_argument("--require-faster", type=float, default=None, metavar="FROM_L",
                    help="ab: exit 1 unless the Gluon kernel is faster than Triton's at every L >= FROM_L")
    a = ap.parse_args()
    if a.what == "compile":
        for variant in a.variants.split(","):
            for st in map(int, a.stages.split(",")):
                compile_sm90(st, variant)
    else:
        sys.path.insert(0, os.getcwd())
        ratios = ab(a.variants.split(","), [int(x) for x in a.lengths.split(",")])
        print("Gluon / Triton time:", {f"{v} {L}": round(r, 3) for (v, L), r in ratios.items()})
        if a.require_faster is not None and any(r >= 1 for (_, L), r in ratios.items() if L >= a.require_faster):
            sys.exit(1)


if __name__ == "__main__":
    main()
