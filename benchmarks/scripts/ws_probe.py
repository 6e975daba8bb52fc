"""Does Triton warp-specialize a DIFF forward loop for sm_90? Compile-only: no GPU needed.

    PYTHONPATH=/tmp/t36site:. python benchmarks/scripts/ws_probe.py

(/tmp/t36site holds the GPU machine's Triton: `pip install --no-deps --target /tmp/t36site
triton==3.6.0`.) A minimal two-map online-softmax forward (DIFF V1's structure: two query and key
sub-heads, one V, two accumulators, K/V and Q through tensor descriptors) is compiled for sm_90 with
`tl.range(..., warp_specialize=True)` in variants that each add one feature of
`paired_softmax.paired_attention_fwd`. A variant is specialized when the TTGIR holds a
`ttg.warp_specialize` op and the PTX re-balances registers with `setmaxnreg` (the consumers'
counts are printed); "refused" gives the compiler's first warning. What the verdicts mean for the
kernels: docs/kernels.md, "Next steps".
"""
import io
import os
import re
import sys
import tempfile
from contextlib import redirect_stderr

import subprocess

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def two_map_fwd(Q, K, V, O, O2, L, sql, svl, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, WS: tl.constexpr, DIAGONAL_LOOP: tl.constexpr, SCALE: tl.constexpr,
                STORE_O2: tl.constexpr, Q_POINTERS: tl.constexpr):
    """Causal, one (batch, head) per grid column. DIAGONAL_LOOP: the masked diagonal blocks in a loop
    of their own after the unmasked one (the kernels' structure) instead of a mask in every
    iteration. SCALE: scores multiplied by a constant softmax scale (the kernels fold log2(e)/sqrt(d)
    into exp2's argument); 0 leaves them unscaled. STORE_O2: map 2's output stored too, as the kernels
    save it for the backward. Q_POINTERS: the query tiles loaded through pointers (as the kernels do)
    instead of tensor descriptors."""
    pid = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * L * sql
    vbase = tl.program_id(1).to(tl.int64) * L * svl
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if Q_POINTERS:
        q_ptrs = Q + base + offs_m[:, None] * sql + tl.arange(0, D)[None, :]
        q1, q2 = tl.load(q_ptrs), tl.load(q_ptrs + D)
    else:
        q1 = tl.make_tensor_descriptor(Q + base, [L, D], [sql, 1], [BLOCK_M, D]).load([pid * BLOCK_M, 0])
        q2 = tl.make_tensor_descriptor(Q + base + D, [L, D], [sql, 1], [BLOCK_M, D]).load([pid * BLOCK_M, 0])
    k1_desc = tl.make_tensor_descriptor(K + base, [L, D], [sql, 1], [BLOCK_N, D])
    k2_desc = tl.make_tensor_descriptor(K + base + D, [L, D], [sql, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + vbase, [L, DV], [svl, 1], [BLOCK_N, DV])
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV], tl.float32)
    acc2 = tl.zeros([BLOCK_M, DV], tl.float32)
    hi = pid * BLOCK_M if DIAGONAL_LOOP else (pid + 1) * BLOCK_M
    for start in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
        k1, k2, v = k1_desc.load([start, 0]), k2_desc.load([start, 0]), v_desc.load([start, 0])
        s1 = tl.dot(q1, tl.trans(k1))
        s2 = tl.dot(q2, tl.trans(k2))
        if SCALE != 0:
            s1 = s1 * SCALE
            s2 = s2 * SCALE
        if not DIAGONAL_LOOP:
            future = offs_m[:, None] < (start + tl.arange(0, BLOCK_N))[None, :]
            s1 = tl.where(future, float("-inf"), s1)
            s2 = tl.where(future, float("-inf"), s2)
        n1 = tl.maximum(m1, tl.max(s1, 1))
        n2 = tl.maximum(m2, tl.max(s2, 1))
        p1 = tl.math.exp2(s1 - n1[:, None])
        p2 = tl.math.exp2(s2 - n2[:, None])
        a1 = tl.math.exp2(m1 - n1)
        a2 = tl.math.exp2(m2 - n2)
        l1 = l1 * a1 + tl.sum(p1, 1)
        l2 = l2 * a2 + tl.sum(p2, 1)
        acc1 = tl.dot(p1.to(v.dtype), v, acc1 * a1[:, None])
        acc2 = tl.dot(p2.to(v.dtype), v, acc2 * a2[:, None])
        m1, m2 = n1, n2
    if DIAGONAL_LOOP:
        for start in range(pid * BLOCK_M, (pid + 1) * BLOCK_M, BLOCK_N):
            k1, k2, v = k1_desc.load([start, 0]), k2_desc.load([start, 0]), v_desc.load([start, 0])
            future = offs_m[:, None] < (start + tl.arange(0, BLOCK_N))[None, :]
            s1 = tl.where(future, float("-inf"), tl.dot(q1, tl.trans(k1)))
            s2 = tl.where(future, float("-inf"), tl.dot(q2, tl.trans(k2)))
            n1 = tl.maximum(m1, tl.max(s1, 1))
            n2 = tl.maximum(m2, tl.max(s2, 1))
            p1 = tl.math.exp2(s1 - n1[:, None])
            p2 = tl.math.exp2(s2 - n2[:, None])
            l1 = l1 * tl.math.exp2(m1 - n1) + tl.sum(p1, 1)
            l2 = l2 * tl.math.exp2(m2 - n2) + tl.sum(p2, 1)
            acc1 = tl.dot(p1.to(v.dtype), v, acc1 * tl.math.exp2(m1 - n1)[:, None])
            acc2 = tl.dot(p2.to(v.dtype), v, acc2 * tl.math.exp2(m2 - n2)[:, None])
            m1, m2 = n1, n2
    o2 = acc2 / l2[:, None]
    out = acc1 / l1[:, None] - 0.5 * o2
    tl.make_tensor_descriptor(O + vbase, [L, DV], [svl, 1], [BLOCK_M, DV]).store([pid * BLOCK_M, 0], out.to(tl.bfloat16))
    if STORE_O2:
        tl.make_tensor_descriptor(O2 + vbase, [L, DV], [svl, 1], [BLOCK_M, DV]).store([pid * BLOCK_M, 0],
                                                                                        o2.to(tl.bfloat16))


VARIANTS = {  # name -> (num_warps, DIAGONAL_LOOP, SCALE, STORE_O2, Q_POINTERS)
    "one loop, mask in every block, 4 warps": (4, False, 0, False, False),
    "one loop, 8 warps": (8, False, 0, False, False),
    "unmasked loop + diagonal loop": (4, True, 0, False, False),
    "one loop, scores scaled": (4, False, 0.18033688011112042, False, False),
    "one loop, o2 stored too": (4, False, 0, True, False),
    "one loop, Q through pointers": (4, False, 0, False, True),
}


def probe(warps, diagonal_loop, scale, store_o2, q_pointers, d=64, dv=128, block_m=128, block_n=64, stages=2):
    consts = dict(D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n, WS=True, DIAGONAL_LOOP=diagonal_loop, SCALE=scale,
                  STORE_O2=store_o2, Q_POINTERS=q_pointers)
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "O2": "*bf16", "L": "i32", "sql": "i32",
           "svl": "i32"}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=two_map_fwd, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(8)})  # as the JIT hints at launch
    os.environ["MLIR_ENABLE_DIAGNOSTICS"] = "warnings"
    err = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            with redirect_stderr(err):
                c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - the pass pipeline's failure is the verdict
        warning = next((ln.split("warning: ", 1)[1] for ln in err.getvalue().splitlines() if "warning: " in ln), "")
        return f"refused ({type(e).__name__}{': ' + warning if warning else ''})"
    regs = sorted({int(n) for n in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", c.asm["ptx"])})
    stack = spill_stack(c.asm["cubin"])
    if "ttg.warp_specialize(" in c.asm["ttgir"]:
        return f"specialized (setmaxnreg.inc {regs}, stack {stack} B, shared {c.metadata.shared} B)"
    return f"compiled, not specialized (stack {stack} B)"


def spill_stack(cubin):
    """Bytes of local memory a thread uses (spills), from the cubin's resource usage."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def main():
    print(f"triton {triton.__version__}, sm_90, DIFF V1 shape d 64 / v 128, tile (128, 64), 2 stages")
    for name, variant in VARIANTS.items():
        print(f"- {name}: {probe(*variant)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
