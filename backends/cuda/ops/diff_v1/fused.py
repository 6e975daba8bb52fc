"""DIFF V1 attention, fused: one Triton pass over K/V for both maps (see ../paired_softmax.py)."""
from ..checks import diff_v1_heads, fused_inputs
from ..paired_op import make_op

# key sub-heads 2g, 2g+1 pair with query sub-heads 2i, 2i+1; lambda is one scalar for every row
_op = make_op("diff_v1", k_step=2, shared_k=False,
              lam_rows=lambda lam, B, L, H: lam.expand(B, L, H),
              lam_grad=lambda d2, lam: (-d2.sum()).to(lam.dtype))


def attention(q, k, v, lam):
    diff_v1_heads(q, k, v, lam)
    fused_inputs(q, k, v)
    return _op(q, k, v, lam)
