"""How close can any bfloat16 implementation get to the reference vectors? The numpy spec in
float64 on inputs rounded to bf16 (x and every matrix; vectors stay float32), per case and tensor.

    PYTHONPATH=. python benchmarks/scripts/bf16_lambda_floor.py [FILE]

Rounding the inputs alone is the floor an implementation computing in bf16 cannot beat (it
adds its own rounding of intermediates on top). DIFF V1's lambda gradients are ill-conditioned
(a sum over all outputs that nearly cancels), so their floor can exceed conformance's 2e-2.
"""
import sys

import numpy as np

from diffattn import conformance, spec


def to_bf16(a):
    """Round float32 to bfloat16 (nearest even) and back, in numpy."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def main(path="tests/fixtures/reference_diffattn.safetensors"):
    print(f"{'case':16s} {'out':>9s} {'grad_x':>9s} {'worst grad':>24s} {'rel.err':>9s}")
    for case in conformance.read_cases(path):
        p = {k: to_bf16(v) if v.ndim >= 2 else v for k, v in case.params.items()}
        out, gx, grads = spec.attention_vjp(case.cfg, case.layer, p, to_bf16(case.tensors["x"]), case.tensors["grad_out"])
        errs = {k: conformance.rel_err(grads[k], case.grads[k]) for k in grads}
        worst = max(errs, key=errs.get)
        print(f"{case.name:16s} {conformance.rel_err(out, case.tensors['out']):9.2e} "
              f"{conformance.rel_err(gx, case.tensors['grad_x']):9.2e} {worst:>24s} {errs[worst]:9.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
