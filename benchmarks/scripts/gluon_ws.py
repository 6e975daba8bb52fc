"""The warp-specialized Gluon kernels (backends/cuda/ops/paired/bwd_ws.py: V2's dK/dV, V1's and
V2's dQ) against the Triton ones (paired/launch.py's triton_dkdv, triton_dq): compiled for sm_90 on
any machine, or checked and timed on the GPU.

    PYTHONPATH=/tmp/t36site:. python benchmarks/scripts/gluon_ws.py compile [--stages 2,3]   # any machine
    PYTHONPATH=. python benchmarks/scripts/gluon_ws.py ab [--kernel dq|dkdv] [--lengths 2048,8192,16384] [--stages 2,3,4]   # GPU

The kernels are written against Triton 3.6's Gluon (the device machine's; 3.9 renamed parts of it):
on another release, put 3.6 first (`pip install --no-deps --target /tmp/t36site triton==3.6.0`).
`compile` prints registers, stack, the main loop's instructions per MMA work (and its local loads
and stores: spills) and the instruction mix. `ab` checks the Gluon kernel's gradients against the
Triton kernel's at odd lengths and grouped heads (relative error, bitwise equality), computed into
buffers that held NaN (a skipped store would show), then alternates the two kernels alone at
B*L = 16k, 16 heads, and at the training step's shape.
"""
import argparse
import os

import torch
import triton

from backends.cuda.ops.paired import bwd_ws as ws
from backends.cuda.ops.paired import launch as ps
from backends.cuda.ops.paired.tuning import KernelOptions
from backends.cuda.ops.triton_runtime import descriptor_scratch
from diffattn.numerics import rel_error as rel


def compile_sm90(kernel="dkdv", stages=ws.STAGES, variant="diff_v2"):
    """Compile for sm_90 without a GPU (Triton's own ptxas and cuobjdump): registers, stack, SASS mix."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if kernel == "dkdv":
        fn, consts = ws.paired_attention_bwd_dkdv_ws, ws.constexprs(stages)
    else:
        v1 = variant == "diff_v1"
        fn, consts = ws.paired_attention_bwd_dq_ws, ws.dq_constexprs(128 if v1 else 64, 2 if v1 else 1, stages)
    pointers = {"Q", "K", "V", "DO", "LAM", "DK", "DV_", "DQ"}
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
    from benchmarks.scripts import kernels_resources as kr  # the Triton kernels' main-loop measures, on this SASS
    local = sum(text.startswith(("LDL", "STL")) for text in kr._main_loop_body(sass)[1])
    print(f"{kernel} {variant if kernel == 'dq' else 'diff_v2'} stages {stages}: {regs}, shared "
          f"{compiled.metadata.shared} B, main loop {kr.main_loop(sass)} ({local} local loads/stores), "
          f"EX2 under MMA {kr.exps_under_mma(sass)}, {counts}", flush=True)


def inputs(variant, B, L, H, G, seed=0):
    """bf16 inputs in the projection layout (heads side by side); lse and delta from the
    paired-softmax kernels; the Triton kernels' dQ, dK, dV (both Gluon kernels off)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    v1 = variant == "diff_v1"
    k_step, shared, dv = (2, False, 128) if v1 else (1, True, 64)
    q, k, v, do = r(B, L, 2 * H, 64), r(B, L, k_step * G, 64), r(B, L, G, dv), r(B, L, H, dv)
    lam = (torch.tensor(0.6, device="cuda", dtype=torch.bfloat16).expand(B, L, H) if v1  # one scalar, as V1's
           else torch.rand(B, L, H, device="cuda", generator=gen).to(torch.bfloat16))
    out, o2, lse = ps.forward(q, k, v, lam, k_step, shared)
    triton_only = KernelOptions(dkdv_ws=False, dq_ws=False)
    dq, dk, dv, delta = ps.backward(do, q, k, v, lam, out, o2, lse, k_step, shared, options=triton_only)
    return (do, q, k, v, lam, lse, delta), dict(dq=dq, dk=dk, dv=dv), k_step


def poisoned(fn, *args):
    """fn's gradients computed into buffers that held NaN (a skipped store would leave NaN): the
    caching allocator hands the freed NaN-filled blocks back to the kernel's torch.empty; returns
    the gradients and whether it did."""
    first = fn(*args)
    ptrs = {t.fill_(float("nan")).data_ptr() for t in first}
    del first
    got = fn(*args)
    return got, {t.data_ptr() for t in got} == ptrs


def ab(kernel, lengths, stages):
    """The Triton and Gluon kernels of `kernel` (dkdv: V2; dq: V1 and V2; the Gluon one at each ring
    depth in `stages`) checked against the Triton kernel's gradients at odd shapes, then timed alone,
    alternating, at B*L = 16k, 16 heads and at the training step's shape (B 8, L 2048, 8 heads)."""
    from triton.testing import do_bench

    from benchmarks._common import warm_gpu

    warm_gpu()
    variants = ("diff_v2",) if kernel == "dkdv" else ("diff_v1", "diff_v2")
    names = ("dk", "dv") if kernel == "dkdv" else ("dq",)

    def codes(k_step):
        shared = k_step == 1
        if kernel == "dkdv":
            return (("triton", lambda *a: ps.triton_dkdv(*a, k_step, shared)),
                    *((f"gluon ws {st} stages", lambda *a, st=st: ws.dkdv(*a, stages=st)) for st in stages))
        return (("triton", lambda *a: (ps.triton_dq(*a, k_step, shared),)),
                *((f"gluon ws {st} stages", lambda *a, st=st: (ws.dq(*a, k_step, stages=st),)) for st in stages))

    print(f"| variant | B | L | H | G | {kernel} kernel | ms | TFLOP/s | "
          + " | ".join(f"err {n}" for n in names) + " | bitwise equal | into NaN buffers |")
    print("|" + "---|" * (9 + len(names)))
    for variant in variants:
        for B, L, H, G in ((3, 300, 4, 4), (2, 1000, 4, 2), (1, 64, 2, 2), (2, 100, 4, 1), (1, 129, 2, 1)):
            args, want, k_step = inputs(variant, B, L, H, G)
            triton.set_allocator(descriptor_scratch)  # Triton's allocator for in-kernel descriptors
            for name, fn in codes(k_step):
                got, reused = poisoned(fn, *args)
                errs = " | ".join(f"{rel(a, want[n]):.1e}" for a, n in zip(got, names))
                same = all(torch.equal(a, want[n]) for a, n in zip(got, names))
                print(f"| {variant} | {B} | {L} | {H} | {G} | {name} | - | - | {errs} | {'yes' if same else 'no'} "
                      f"| {'yes' if reused else 'no'} |", flush=True)
        shapes = [(max(1, 16384 // L), L, 16) for L in lengths] + [(8, 2048, 8)]
        for B, L, H in shapes:
            args, want, k_step = inputs(variant, B, L, H, H)
            triton.set_allocator(descriptor_scratch)
            # causal FLOPs a DIFF head: dK/dV 6 N^2 d (V2); dQ: two QK^T, dP (V's width) and two dQ products, halved
            per_head = 6 * 64 if kernel == "dkdv" else (4 * 64 + 2 * args[3].shape[-1] + 4 * 64) / 2
            flops = B * H * L * L * per_head
            for rnd in range(2):
                for name, fn in codes(k_step):
                    got = fn(*args)
                    ms = do_bench(lambda: fn(*args), return_mode="median")
                    errs = " | ".join(f"{rel(a, want[n]):.1e}" for a, n in zip(got, names))
                    print(f"| {variant} | {B} | {L} | {H} | {H} | {name} (round {rnd + 1}) | {ms:.3f} | "
                          f"{flops / ms / 1e9:.0f} | {errs} | - | - |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("compile", "ab"))
    ap.add_argument("--kernel", default="dq", choices=("dkdv", "dq"), help="ab: which kernel pair")
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--stages", default=str(ws.STAGES))
    a = ap.parse_args()
    if a.what == "compile":
        for st in map(int, a.stages.split(",")):
            compile_sm90("dkdv", st)
            for variant in ("diff_v1", "diff_v2"):
                compile_sm90("dq", st, variant)
    else:
        # the Triton launchers go through torch's wrap_triton, whose dispatch costs the host more
        # than a short kernel takes (kernels_sweep.py); time the launches as the ops' eager path does
        from torch._library.triton import set_wrap_triton_enabled
        with set_wrap_triton_enabled(False):
            ab(a.kernel, [int(x) for x in a.lengths.split(",")], [int(x) for x in a.stages.split(",")])


if __name__ == "__main__":
    main()
