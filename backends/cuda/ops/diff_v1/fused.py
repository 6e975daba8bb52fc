"""DIFF V1 attention, fused: one Triton pass over K/V for both maps (the paired-softmax op, ../paired/)."""
from ..checks import diff_v1_heads, fused_inputs
from ..paired.op import make_op
from ..paired.tuning import DEFAULT


# named functions, not lambdas: torch.library.triton_op reads the op's source, helpers included
def lam_rows(lam, B, L, H):  # one scalar for every row, as a zero-stride view
    return lam.expand(B, L, H)


def lam_grad(d2, lam):
    return (-d2.sum()).to(lam.dtype)


# key sub-heads 2g, 2g+1 pair with query sub-heads 2i, 2i+1
_op = make_op("diff_v1", k_step=2, shared_k=False, lam_rows=lam_rows, lam_grad=lam_grad,
              with_norm=True)


def attention(q, k, v, lam, norm=None, options=DEFAULT):
    diff_v1_heads(q, k, v, lam)
    fused_inputs(q, k, v)
    return _op(q, k, v, lam, norm, options)
