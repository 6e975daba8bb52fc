"""Accuracy of the fused DIFF kernels against the float64 numpy oracle (the one tests/test_cuda_ops.py
uses, built from diffattn.spec), per tensor: output and the gradients of q, k, v and lambda.

    PYTHONPATH=. python benchmarks/scripts/kernels_accuracy.py --out DIR [--commit HASH]

Shapes are the GPU test cases (L never a multiple of the tile sizes; GQA, MHA and MQA; head_dim 32,
64, 128); inputs are rounded to the tested dtype before the oracle sees them. Float32 runs every dot
in IEEE precision (no tf32). Acceptance: <= 1e-5 relative in float32, <= 2e-2 in bf16 / fp16.
"""
import argparse
import importlib.util
import os
import sys

import torch

_spec = importlib.util.spec_from_file_location(
    "test_cuda_ops", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "test_cuda_ops.py"))
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = T.GPU_CASES if device == "cuda" else T.FUSED_CPU_SHAPES
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device == "cuda" else (torch.float32, torch.float16)
    rows = []
    for variant in ("diff_v1", "diff_v2"):
        for shape in cases:
            for dtype in dtypes:
                errs = T.check(variant, "fused", *shape, dtype, device=device, strided=True)
                tol = T.TOL[dtype]
                rows.append(dict(variant=variant, shape=shape, dtype=str(dtype).replace("torch.", ""), tol=tol,
                                 ok=all(e <= tol for e in errs.values()), **errs))
    lines = [f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}",
             f"commit: {a.commit}", f"command: python {' '.join(sys.argv)}", "",
             "| variant | B, L, H, G, d | dtype | out | dq | dk | dv | dlam | tol | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {', '.join(map(str, r['shape']))} | {r['dtype']} | "
                     + " | ".join(f"{r[k]:.1e}" for k in ("out", "dq", "dk", "dv", "dlam")) + f" | {r['tol']:.0e} | {r['ok']} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernels_accuracy.md"), "w") as f:
        f.write(text + "\n")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
