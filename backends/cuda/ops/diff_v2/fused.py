"""DIFF V2 attention, fused: both query heads of a pair share each K/V tile (the paired-softmax op, ../paired/)."""
from ..checks import diff_v2_heads, fused_inputs
from ..paired.op import make_op
from ..paired.tuning import DEFAULT


# named functions, not lambdas: torch.library.triton_op reads the op's source, helpers included
def lam_rows(lam, B, L, H):  # one value per (batch, row, head) already
    return lam


def lam_grad(d2, lam):  # d2 (B, H, L) -> lam's (B, L, H)
    return (-d2.transpose(1, 2)).to(lam.dtype).contiguous()


# both query heads of pair i read kv head i // (H / G)
_op = make_op("diff_v2", k_step=1, shared_k=True, lam_rows=lam_rows, lam_grad=lam_grad)


def attention(q, k, v, lam, options=DEFAULT):
    diff_v2_heads(q, k, v, lam)
    fused_inputs(q, k, v)
    return _op(q, k, v, lam, options=options)
