"""Tile loads the paired-softmax forward and dQ kernels share (Triton).

Output head i reads query sub-heads 2i (map 1) and 2i+1 (map 2) and kv head g = i // GROUP; the
keys of both maps come either as one shared head (DIFF V2) or as sub-heads 2g, 2g+1 (DIFF V1).
"""
import triton
import triton.language as tl


@triton.jit
def _kv_block(k1_src, k2_src, v_src, skl, svl, start_n, L, D: tl.constexpr, DV: tl.constexpr,
              SHARED_K: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Key rows start_n.. of both key sub-heads (one, if shared) and of V; rows past L read 0.
    The sources are tensor descriptors when TMA (the copy engine zero-fills past L), else pointers."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k1 = k1_src.load([start_n, 0])
        if SHARED_K:
            k2 = k1
        else:
            k2 = k2_src.load([start_n, 0])
        v = v_src.load([start_n, 0])
    else:
        kv_ok = (offs_n < L)[:, None]
        k1 = tl.load(k1_src + offs_n[:, None] * skl + tl.arange(0, D)[None, :], mask=kv_ok, other=0.0)
        if SHARED_K:
            k2 = k1
        else:
            k2 = tl.load(k2_src + offs_n[:, None] * skl + tl.arange(0, D)[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_src + offs_n[:, None] * svl + tl.arange(0, DV)[None, :], mask=kv_ok, other=0.0)
    return offs_n, k1, k2, v


@triton.jit
def _kv_sources(k1_base, k2_base, v_base, skl, svl, L, D: tl.constexpr, DV: tl.constexpr, SHARED_K: tl.constexpr,
                BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """What _kv_block reads from: (L, D) / (L, DV) tensor descriptors of this head when TMA, else the bases."""
    if TMA:
        k1_src = tl.make_tensor_descriptor(k1_base, shape=[L, D], strides=[skl, 1], block_shape=[BLOCK_N, D])
        if SHARED_K:
            k2_src = k1_src
        else:
            k2_src = tl.make_tensor_descriptor(k2_base, shape=[L, D], strides=[skl, 1], block_shape=[BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[L, DV], strides=[svl, 1], block_shape=[BLOCK_N, DV])
    else:
        k1_src, k2_src, v_src = k1_base, k2_base, v_base
    return k1_src, k2_src, v_src




@triton.jit
def _query_rows(pid_m, L, H, GROUP, BLOCK_M: tl.constexpr):
    """This program's (batch, output head i, kv head g) and query rows. Grid axis 0 is (batch, head);
    the launchers walk axis 1 backwards (pid_m), so the query blocks with the most keys start first
    and the short ones fill the last wave. Q is not an argument: torch.compile's mutation analysis
    counts every argument of a call whose results address a store as written, and would copy Q."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    i = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, i, i // GROUP, pid_m * BLOCK_M, offs_m, offs_m < L


@triton.jit
def _query_tiles(Q, sqb, sql, sqh, b, i, offs_m, row_ok, D: tl.constexpr):
    """Both query sub-heads' tiles of output head i."""
    q_off = b * sqb + (2 * i) * sqh + offs_m[:, None] * sql + tl.arange(0, D)[None, :]
    return (tl.load(Q + q_off, mask=row_ok[:, None], other=0.0),
            tl.load(Q + q_off + sqh, mask=row_ok[:, None], other=0.0))

