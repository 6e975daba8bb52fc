"""DIFF V2 attention, fused: both query heads of a pair share each K/V tile (see ../paired_softmax.py)."""
from ..checks import diff_v2_heads, fused_inputs
from ..paired_op import make_op

# both query heads of pair i read kv head i // (H / G); lambda is one value per (batch, row, head)
_op = make_op("diff_v2", k_step=1, shared_k=True,
              lam_rows=lambda lam, B, L, H: lam,
              lam_grad=lambda d2, lam: (-d2.transpose(1, 2)).to(lam.dtype).contiguous())


def attention(q, k, v, lam):
    diff_v2_heads(q, k, v, lam)
    fused_inputs(q, k, v)
    return _op(q, k, v, lam)
