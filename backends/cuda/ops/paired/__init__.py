"""Causal attention with two softmax maps per output head, the kernel op DIFF V1 and V2 share.

Output head i reads query sub-heads 2i (map 1) and 2i+1 (map 2) and kv head g = i // GROUP:
    out_i = softmax(q1 k1^T s) v - lam * softmax(q2 k2^T s) v
DIFF V1: k1, k2 are key sub-heads 2g, 2g+1 (K_STEP=2, SHARED_K=False), v is 2d wide, lam one
scalar (passed with zero strides). DIFF V2: k1 = k2 = key head g (K_STEP=1, SHARED_K=True), v is
d wide, lam one value per (batch, position, head).

One module per role (flash-linear-attention's layout):
    naive.py     the op's contract materialized in torch (out, o2, lse): what the kernels compute
    loads.py     tile loads the forward and dQ kernels share (Triton)
    fwd.py       the forward kernel (Triton), with DIFF V1's subln in its epilogue
    bwd.py       the backward kernels (Triton): deltas (+ subln backward), dK/dV, dQ
    bwd_ws.py    warp-specialized backward kernels for sm_90 (Gluon, Triton 3.6): V2's dK/dV, dQ
    tuning.py    tile tables and KernelOptions, the frozen launch options a caller passes in
    launch.py    launchers: tiles and paths from the options, outputs allocated, kernels launched
    op.py        the torch.library ops with autograd, one set per options; diff_v1/ and diff_v2/ call it
"""
from .tuning import DEFAULT, KernelOptions, parse_options, parse_tiles

__all__ = ["DEFAULT", "KernelOptions", "parse_options", "parse_tiles"]
