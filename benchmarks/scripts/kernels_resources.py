"""Registers, spills, wgmma pipelining and instruction mix of the paired-softmax Triton kernels,
compiled ahead of time for a Hopper GPU (sm_90) on any machine: no GPU needed, only Triton's own
ptxas and cuobjdump.

    PYTHONPATH=. python benchmarks/scripts/kernels_resources.py [--tiles fwd:128,64,8,3 ...]
        [--constexprs DIAGONAL=last] [--out DIR]

For each kernel (forward, dK/dV, dQ) of DIFF V1 and V2 at d 64 and 128, with the tiles the GPU
uses (paired/tuning.py's blocks) and, for the kernels that have it, with and without TMA loads:
registers per thread, the stack frame (spilled registers live there), whether ptxas serialized the
warpgroup MMAs (its advisory C7515: each wgmma then waits for the one before), the main loop's
instructions per warp against its multiply-adds per warpgroup, how many of its exponentials issue
while an MMA group is in flight (where ptxas put the waits), and static SASS counts (prologue,
loops and epilogue together) of HGMMA, spill traffic (LDL / STL), exponentials (MUFU.EX2), bulk
tensor copies (UTMALDG), FP32, integer and shared-memory instructions.
The compile mimics a launch at the tables' shapes: the JIT's divisibility hints on pointers and
strides (without them the compiler cannot vectorize loads and every count is wrong) and GROUP = 1.
Register allocation differs between Triton versions: to read what the GPU machine runs, install its
Triton beside the project's and put it first, e.g.
    pip install --no-deps --target /tmp/t36site triton==3.6.0
    PYTHONPATH=/tmp/t36site:. python benchmarks/scripts/kernels_resources.py
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from backends.cuda.ops.paired import bwd, fwd, tuning

KERNELS = {
    "fwd": (fwd.paired_attention_fwd, ("Q", "K", "V", "LAM", "OUT", "O2", "Y")),
    "dkdv": (bwd.paired_attention_bwd_dkdv, ("Q", "K", "V", "DO", "LAM", "DK", "DV_")),
    "dq": (bwd.paired_attention_bwd_dq, ("Q", "K", "V", "DO", "LAM", "DQ")),
    "delta": (bwd.paired_attention_bwd_delta, ("OUT", "O2", "DO", "LAM", "DX")),
}
FLOAT32_POINTERS = ("LSE", "DELTA", "W", "DW_PART")
# static counts in the SASS: tensor-core MMAs, spill traffic, exponentials, bulk copies, then the
# per-score FP32 work (FFMA, FMUL, FADD, F2FP conversions), integer / address work (IMAD, LOP3) and
# shared-memory traffic of layout conversions and cross-warp reductions (STS, LDS), the barriers
# that order it (BAR.SYNC), and asynchronous global-to-shared copies of pipelined loads (LDGSTS)
SASS_OPS = ("HGMMA", "LDL", "STL", "MUFU.EX2", "UTMALDG", "FFMA", "FMUL", "FADD", "F2FP", "IMAD", "LOP3", "STS", "LDS",
            "BAR.SYNC", "LDGSTS")


def signature(fn, bf16_pointers, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in bf16_pointers:
            sig[name] = "*bf16"
        elif name in FLOAT32_POINTERS:
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")  # ptxas, cuobjdump


def ptxas_advice(ptx, arch):
    """What `ptxas -v` says about a PTX file for sm_{arch} (e.g. '90a'): registers, spills, advisories."""
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([os.path.join(TOOLS, "ptxas"), f"-arch=sm_{arch}", "-v", ptx, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr


def wgmma_verdict(advice):
    """'serialized' when ptxas made every wgmma wait for the one before (its advisory C7515)."""
    return "serialized" if "C7515" in advice else "pipelined"


def _main_loop_body(sass):
    """The main loop's instructions: of the innermost loops (a backward branch and its target, no
    loop inside) with the most warpgroup MMAs, the shortest (the unmasked one); None without one."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in where:
            loops.append((where[int(target.group(1), 16)], i))
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    rows = []
    for s, e in inner:
        macs = sum(64 * int(n) * 16 for n in re.findall(r"HGMMA\.64x(\d+)x16", " ".join(t for _, t in ins[s:e + 1])))
        if macs:
            rows.append((macs, -(e - s + 1), s))
    if not rows:
        return None
    macs, minus_n, s = max(rows)
    return macs, [t for _, t in ins[s:s - minus_n]]


def main_loop(sass):
    """'instructions / MMA work' of one main-loop iteration. Instructions are per warp; MMA work is
    the iteration's multiply-adds per warpgroup (an HGMMA.64xNx16 does 64 N 16), in thousands.
    Their ratio is the issue work each MMA carries."""
    found = _main_loop_body(sass)
    return "-" if found is None else f"{len(found[1])} / {found[0] // 1024}k"


def exps_under_mma(sass):
    """'k / n': of the main loop's n exponentials (MUFU.EX2), the k issued while a warpgroup MMA
    group is in flight (from its first HGMMA until the WARPGROUP.DEPBAR that retires it; the loop is
    walked twice so groups left in flight at the back edge count). Only such exponentials can run
    under the tensor cores within one warpgroup; ptxas decides where the waits go."""
    found = _main_loop_body(sass)
    if found is None:
        return "-"
    body, opened, in_flight, under, total = found[1], False, 0, 0, 0
    for lap in range(2):
        for text in body:
            if text.startswith("HGMMA"):
                if not opened:
                    in_flight, opened = in_flight + 1, True
                if "gsb0" in text:
                    opened = False
            elif text.startswith("WARPGROUP.DEPBAR.LE"):
                in_flight = min(in_flight, int(text.split(",")[-1], 16))
            elif "MUFU.EX2" in text and lap == 1:
                total += 1
                under += in_flight > 0
    return f"{under} / {total}"


def jit_divisibility(fn, sig):
    """The tt.divisibility=16 hints Triton's JIT gives at launch to every pointer and every integer
    divisible by 16: all strides and L of the tables' shapes, not H. Without them the compiler cannot
    prove 16-byte alignment and emits one 2-byte load per element, which misstates the main loop."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name] not in ("constexpr", "fp32") and name != "H"}


def resources(kernel, variant, d, tile, tma, arch, options=None):
    """-> dict of the compiled kernel's resource usage and SASS instruction counts."""
    fn, pointers = KERNELS[kernel]
    v1 = variant == "diff_v1"
    DV = 2 * d if v1 else d
    slices = tuning.fwd_slices(d, DV, torch.bfloat16) if kernel == "fwd" else 1
    bm, bn, warps, stages = tile
    consts = dict(D=d, DV=DV // slices, K_STEP=2 if v1 else 1, SHARED_K=not v1, BLOCK_M=bm, BLOCK_N=bn, PREC="tf32")
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # the deltas' pass has no D, K_STEP, ...
    if "TMA" in fn.arg_names:
        consts["TMA"] = tma
    if "SCALAR_LAM" in fn.arg_names:
        consts["SCALAR_LAM"] = v1  # V1's lambda is one scalar
    if "NORM" in fn.arg_names:  # the model's V1 normalizes (subln): the forward where rows are whole, and
        consts["NORM"] = v1 and slices == 1  # the deltas' pass always
    if "GRADS_LIKE_INPUTS" in fn.arg_names:  # the tables' and the model's inputs are contiguous
        consts["GRADS_LIKE_INPUTS"] = True
    if "DIAGONAL" in fn.arg_names:
        consts["DIAGONAL"] = tuning.dkdv_diagonal(d, DV, torch.bfloat16)
        consts["PAIRS_TOGETHER"] = 1  # the grid's own order; --constexprs PAIRS_TOGETHER=16 for another
    consts.update({k: v for k, v in (options or {}).items() if k in fn.arg_names})
    if "STEPS" in fn.arg_names:  # the deltas' passes: blocks per program and load stages in the tile
        consts["STEPS"], consts["LOAD_STAGES"] = bn, stages
    if "GROUP" in fn.arg_names:  # the tables' shapes: one query head per kv head, an int the JIT makes a constant
        consts["GROUP"] = 1
    sig = signature(fn, pointers, consts)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=jit_divisibility(fn, sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        usage, sass = (subprocess.run([os.path.join(TOOLS, "cuobjdump"), flag, cubin], capture_output=True,
                                      text=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
        advice = ptxas_advice(ptx, f"{arch}a")
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    row = dict(regs=int(m.group(1)), stack=int(m.group(2)), wgmma=wgmma_verdict(advice) if "HGMMA" in sass else "-")
    row["loop"] = main_loop(sass)
    row["ex2_under_mma"] = exps_under_mma(sass)
    row.update({op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass)) for op in SASS_OPS})
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tiles", nargs="*", default=[],
                    help="kernel:BLOCK_M,BLOCK_N,warps,stages to add for every variant and d, e.g. dkdv:64,128,16,2")
    ap.add_argument("--constexprs", default="", help="NAME=value,... set in every kernel that has them (A/B a variant)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    options = {k: int(v) if v.isdigit() else v for k, v in (item.split("=") for item in a.constexprs.split(",") if item)}
    extra = [(t.split(":")[0], tuple(int(x) for x in t.split(":")[1].split(","))) for t in a.tiles]
    columns = ["kernel", "variant", "d", "tile (BM, BN, warps, stages)", "loads", "regs", "stack B", "wgmma",
               "main loop: instr / k MACs",
               "main loop: EX2 under MMA", *SASS_OPS]
    lines = [f"triton {triton.__version__}, target sm_{a.arch}, bf16 inputs; commands: "
             f"`PYTHONPATH=. python benchmarks/scripts/kernels_resources.py {' '.join(sys.argv[1:])}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print("\n".join(lines), flush=True)
    for variant in ("diff_v1", "diff_v2"):
        for d in (64, 128):
            DV = 2 * d if variant == "diff_v1" else d
            for kernel in KERNELS:
                blocks_of = "norm_delta" if kernel == "delta" and variant == "diff_v1" else kernel  # V1's subln
                tiles = [tuning.blocks(blocks_of, d, DV, torch.bfloat16, variant == "diff_v2")]
                tiles += [t for k, t in extra if k == kernel and t not in tiles]
                for tile in tiles:
                    for tma in ((False, True) if "TMA" in KERNELS[kernel][0].arg_names else (False,)):
                        try:
                            r = resources(kernel, variant, d, tile, tma, a.arch, options)
                            cells = [r["regs"], r["stack"], r["wgmma"], r["loop"], r["ex2_under_mma"],
                                     *(r[op] for op in SASS_OPS)]
                        except Exception as e:  # a tile that does not compile (shared memory, layout)
                            cells = [f"does not compile: {type(e).__name__}"] + [""] * (len(SASS_OPS) + 3)
                        line = "| " + " | ".join(map(str, [kernel, variant, d, tile, "tma" if tma else "pointers",
                                                            *cells])) + " |"
                        lines.append(line)
                        print(line, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "kernels_resources.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
