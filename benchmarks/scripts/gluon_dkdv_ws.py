"""V2's Gluon warp-specialized dK/dV kernel (backends/cuda/ops/paired_softmax_ws.py) against the
Triton one (paired_softmax.paired_attention_bwd_dkdv): compiled for sm_90 on any machine, or
checked and timed on the GPU.

    PYTHONPATH=/tmp/t36site:. python benchmarks/scripts/gluon_dkdv_ws.py compile [--stages 2,3]   # any machine
    PYTHONPATH=. python benchmarks/scripts/gluon_dkdv_ws.py ab [--lengths 2048,8192,16384]   # GPU

The kernel is written against Triton 3.6's Gluon (the device machine's; 3.9 renamed parts of it):
on another release, put 3.6 first (`pip install --no-deps --target /tmp/t36site triton==3.6.0`).
`compile` prints registers, stack, the main loop's instructions per MMA work (and its local loads
and stores: spills) and the instruction mix. `ab` checks both kernels' dK, dV against
paired_softmax.backward's with the Triton kernel at odd lengths and grouped heads, into buffers
that held NaN (a skipped store would show), then alternates the two dK/dV kernels alone at
B*L = 16k, 16 heads. V1's two Gluon forms were measured with this script as it was at 1f54f4d
(queries on rows) and 9d9e8ad (keys on rows, 32-query blocks); docs/kernels.md, v9.
"""
import argparse
import os
import sys

import torch
import triton

from diffattn.backends.cuda.ops import paired_softmax as ps
from diffattn.backends.cuda.ops import paired_softmax_ws as ws


def compile_sm90(stages=ws.STAGES):
    """Compile for sm_90 without a GPU (Triton's own ptxas and cuobjdump): registers, stack, SASS mix."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = ws.paired_attention_bwd_dkdv_ws
    consts = ws.constexprs(stages)
    pointers = {"Q", "K", "V", "DO", "LAM", "DK", "DV_"}
    sig = {n: "constexpr" if n in consts else "*fp32" if n in ("LSE", "DELTA") else "*bf16" if n in pointers
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
    print(f"stages {stages}: {regs}, shared {compiled.metadata.shared} B, main loop {kr.main_loop(sass)} "
          f"({local} local loads/stores), EX2 under MMA {kr.exps_under_mma(sass)}, {counts}", flush=True)


def inputs(B, L, H, G, seed=0):
    """bf16 V2 inputs in the projection layout; lse and delta from paired_softmax's kernels, and
    the Triton kernel's dK, dV."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v, do = r(B, L, 2 * H, 64), r(B, L, G, 64), r(B, L, G, 64), r(B, L, H, 64)
    lam = torch.rand(B, L, H, device="cuda", generator=gen).to(torch.bfloat16)
    out, o2, lse = ps.forward(q, k, v, lam, 1, True)
    saved, ps.OPTIONS["dkdv_ws"] = ps.OPTIONS["dkdv_ws"], False
    try:
        _, dk, dv, delta = ps.backward(do, q, k, v, lam, out, o2, lse, 1, True)
    finally:
        ps.OPTIONS["dkdv_ws"] = saved
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


def ab(lengths):
    from triton.testing import do_bench

    from benchmarks._common import warm_gpu

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    warm_gpu()
    codes = (("triton", lambda *args: ps.triton_dkdv(*args, 1, True)), ("gluon ws", ws.dkdv))  # V2: K_STEP 1, shared K
    print("| B | L | H | G | dK/dV kernel | ms | TFLOP/s (6 N^2 d a head) | err dk | err dv | into NaN buffers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, L, H, G in ((3, 300, 4, 4), (2, 1000, 4, 2), (1, 64, 2, 2), (2, 100, 4, 1), (1, 129, 2, 1)):
        args, want = inputs(B, L, H, G)
        ps._use_tma(args[1])  # Triton's allocator for in-kernel descriptors
        for name, fn in codes:
            got, reused = poisoned(fn, *args)
            print(f"| {B} | {L} | {H} | {G} | {name} | - | - | {rel(got[0], want[0]):.1e} | {rel(got[1], want[1]):.1e} "
                  f"| {'yes' if reused else 'no'} |", flush=True)
    for L in lengths:
        B, H = max(1, 16384 // L), 16
        args, want = inputs(B, L, H, H)
        ps._use_tma(args[1])
        flops = 6 * B * H * L * L * 64  # QK^T x2, dP, dV, dK x2 over the causal half: 6 N^2 d a head
        for rnd in range(2):
            for name, fn in codes:
                got = fn(*args)
                ms = do_bench(lambda: fn(*args), return_mode="median")
                print(f"| {B} | {L} | {H} | {H} | {name} (round {rnd + 1}) | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                      f"{rel(got[0], want[0]):.1e} | {rel(got[1], want[1]):.1e} | - |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "ab"))
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--stages", default=str(ws.STAGES))
    a = ap.parse_args()
    if a.what == "compile":
        for st in map(int, a.stages.split(",")):
            compile_sm90(st)
    else:
        sys.path.insert(0, os.getcwd())
        ab([int(x) for x in a.lengths.split(",")])


if __name__ == "__main__":
    main()
