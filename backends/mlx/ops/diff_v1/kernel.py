"""The DIFF V1 kernels on matrix units, written once: three bodies plus one prelude per dialect.

    fwd   out (B,L,H,2D) = (P1 - lam P2) V and each map's log-sum-exp lse (B,L,H,2)
    dq    dq (B,L,2H,D) and delta (B,L,H,2), delta_m = rowsum(P_m * (dO V^T)) = dO . (P_m V)
    dkdv  dk (B,L,2G,D) and dv (B,L,G,2D), from the saved lse and delta; dlam = -sum(delta_2)

Inputs q (B,L,2H,D), k (B,L,2G,D), v (B,L,G,2D), dout (B,L,H,2D) may be strided views (their
strides are read); lam is one float32. Sub-heads 2h, 2h+1 of q are head h's two maps; head h
reads kv head h // (H/G). Causal, scale 1/sqrt(D).

The bodies compute every product through one small tile interface that each prelude implements
on its hardware's matrix instructions (a warp / SIMD group computes a 16 x TN tile):

    Acc c; acc_zero(c);
    acc_mma<AT, BT>(c, a, lda, b, ldb, K)   c += A (16 x K) . B (K x TN), operands in shared
                                            memory; AT / BT: the operand is stored transposed
    acc_store(c, dst, ldc)                  c to shared float memory, row-major

    Metal  simdgroup_float8x8 multiply-accumulate (TN = TK = 8), operands staged as float
    CUDA   wmma 16x16x16 fragments on the tensor cores (TN = TK = 16), operands in the input
           dtype (bf16 / fp16); float32 inputs take a CUDA-core loop (no TF32 rounding)
    cpu    the same loop, every GPU thread a std::thread (emulate.py): the bodies' tests on CPU

The forward makes two passes over the keys of its query block: the first finds each row's max
and sum, the second forms the exactly normalised P1 - lam P2 and multiplies it with V once, so
the output accumulates in the matrix unit's registers with no per-tile rescale (which opaque
fragments do not allow) at the price of computing Q K^T twice. A warp skips the key tiles its
causal mask removes whole.
"""
from __future__ import annotations

import hashlib
import re

# ---- preludes: what the bodies need that each dialect spells differently ----------------------

SCALAR_ACC = """
// A 16 x TN tile, lane l holding elements l*E .. l*E+E-1 (row-major): products on scalar cores.
struct AccScalar { float e[16 * TN / 32]; };
DEVICE inline void acc_zero(thread_ref(AccScalar) c) {
  for (int i = 0; i < 16 * TN / 32; ++i) c.e[i] = 0.0f;
}
template <bool AT, bool BT>
DEVICE inline void acc_mma(thread_ref(AccScalar) c, const float* a, int lda, const float* b, int ldb, int kdim) {
  constexpr int E = 16 * TN / 32;
  for (int i = 0; i < E; ++i) {
    const int idx = LANE() * E + i, r = idx / TN, n = idx % TN;
    float s = 0.0f;
    for (int kk = 0; kk < kdim; ++kk) {
      s += (AT ? a[kk * lda + r] : a[r * lda + kk]) * (BT ? b[n * ldb + kk] : b[kk * ldb + n]);
    }
    c.e[i] += s;
  }
}
DEVICE inline void acc_store(const thread_ref(AccScalar) c, float* dst, int ldc) {
  constexpr int E = 16 * TN / 32;
  for (int i = 0; i < E; ++i) {
    const int idx = LANE() * E + i;
    dst[(idx / TN) * ldc + idx % TN] = c.e[i];
  }
}
"""

METAL_HEADER = """
#include <metal_simdgroup_matrix>
#define SHARED threadgroup
#define SMEM threadgroup
#define ALIGN32
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define WARP_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
#define EXP2(x) metal::exp2(x)
#define LOG2(x) metal::log2(x)
#define SQRT(x) metal::sqrt(x)
#define FMAX(a, b) metal::max((a), (b))
#define TN 8
#define TK 8
typedef int64_t idx_t;

// A 16 x 8 tile: two 8 x 8 simdgroup matrices (rows 0-7, 8-15).
struct Acc { simdgroup_float8x8 m[2]; };
inline void acc_zero(thread Acc& c) {
  c.m[0] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  c.m[1] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
template <bool AT, bool BT>
inline void acc_mma(thread Acc& c, const threadgroup float* a, int lda, const threadgroup float* b, int ldb, int kdim) {
  simdgroup_float8x8 a0, a1, bm;
  for (int k0 = 0; k0 < kdim; k0 += 8) {
    // AT: A(r, k) = a[k * lda + r], the 8 x 8 block read as stored and transposed on load
    simdgroup_load(a0, a + (AT ? k0 * lda : k0), ulong(lda), ulong2(0, 0), AT);
    simdgroup_load(a1, a + (AT ? k0 * lda + 8 : 8 * lda + k0), ulong(lda), ulong2(0, 0), AT);
    simdgroup_load(bm, b + (BT ? k0 : k0 * ldb), ulong(ldb), ulong2(0, 0), BT);
    simdgroup_multiply_accumulate(c.m[0], a0, bm, c.m[0]);
    simdgroup_multiply_accumulate(c.m[1], a1, bm, c.m[1]);
  }
}
inline void acc_store(const thread Acc& c, threadgroup float* dst, int ldc) {
  simdgroup_store(c.m[0], dst, ulong(ldc));
  simdgroup_store(c.m[1], dst + 8 * ldc, ulong(ldc));
}
"""
METAL_ENTRY = """
using MT = float;   // operands staged as float: simdgroup_load reads its own element type
const int TID = int(thread_position_in_threadgroup.x);
const int BLOCK_X = int(threadgroup_position_in_grid.x);
const int BLOCK_Y = int(threadgroup_position_in_grid.y);
const int BLOCK_Z = int(threadgroup_position_in_grid.z);
"""

CUDA_HEADER = """
#include <mma.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define SHARED __shared__
#define SMEM
#define ALIGN32 __align__(32)
#define BARRIER() __syncthreads()
#define WARP_SYNC() __syncwarp()
#define EXP2(x) exp2f(x)
#define LOG2(x) log2f(x)
#define SQRT(x) sqrtf(x)
#define FMAX(a, b) fmaxf((a), (b))
#define TN 16
#define TK 16
#define DEVICE __device__
#define LANE() int(threadIdx.x % 32)
#define thread_ref(X) X&
typedef long long idx_t;
""" + SCALAR_ACC + """
// A 16 x 16 tile as a wmma accumulator fragment: bf16 / fp16 operands on the tensor cores.
template <typename MT> struct AccWmma {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
};
template <bool B, class X, class Y> struct pick_t { using type = X; };
template <class X, class Y> struct pick_t<false, X, Y> { using type = Y; };
template <typename MT> __device__ inline void acc_zero(AccWmma<MT>& c) { nvcuda::wmma::fill_fragment(c.f, 0.0f); }
template <bool AT, bool BT, typename MT>
__device__ inline void acc_mma(AccWmma<MT>& c, const MT* a, int lda, const MT* b, int ldb, int kdim) {
  using namespace nvcuda;
  using LA = typename pick_t<AT, wmma::col_major, wmma::row_major>::type;
  using LB = typename pick_t<BT, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, LB> fb;
  for (int k0 = 0; k0 < kdim; k0 += 16) {
    wmma::load_matrix_sync(fa, a + (AT ? k0 * lda : k0), lda);
    wmma::load_matrix_sync(fb, b + (BT ? k0 : k0 * ldb), ldb);
    wmma::mma_sync(c.f, fa, fb, c.f);
  }
}
template <typename MT> __device__ inline void acc_store(const AccWmma<MT>& c, float* dst, int ldc) {
  nvcuda::wmma::store_matrix_sync(dst, c.f, ldc, nvcuda::wmma::mem_row_major);
}
template <typename T> struct AccFor { using type = AccWmma<T>; };
template <> struct AccFor<float> { using type = AccScalar; };
"""
CUDA_ENTRY = """
using MT = T;
using Acc = typename AccFor<T>::type;
const int TID = int(threadIdx.x);
const int BLOCK_X = int(blockIdx.x);
const int BLOCK_Y = int(blockIdx.y);
const int BLOCK_Z = int(blockIdx.z);
"""

CPU_HEADER = """
#include <barrier>
#include <cmath>
#include <cstdint>
#define SHARED static
#define SMEM
#define ALIGN32 __attribute__((aligned(32)))
#define BARRIER() cpu_emu::block->arrive_and_wait()
#define WARP_SYNC() cpu_emu::warps[cpu_emu::tid / 32]->arrive_and_wait()
#define EXP2(x) std::exp2(x)
#define LOG2(x) std::log2(x)
#define SQRT(x) std::sqrt(x)
#define FMAX(a, b) std::fmax((a), (b))
#define TK TN
#define DEVICE
#define LANE() (cpu_emu::tid % 32)
#define thread_ref(X) X&
typedef long long idx_t;
namespace cpu_emu {
inline thread_local int tid, bx, by, bz;
inline std::barrier<>* block;
inline std::barrier<>* warps[32];
}
""" + SCALAR_ACC
CPU_ENTRY = """
using MT = float;
using Acc = AccScalar;
const int TID = cpu_emu::tid;
const int BLOCK_X = cpu_emu::bx;
const int BLOCK_Y = cpu_emu::by;
const int BLOCK_Z = cpu_emu::bz;
"""

# ---- the bodies (template constants: T input dtype, D head dim, NW warps, BK keys a tile) -----

COMMON = """
constexpr int NT = NW * 32;            // threads per program
constexpr int RW = 16;                 // rows per warp: the tile's height
constexpr int DV = 2 * D;              // value / output width
constexpr float NEG_BIG = -1.0e30f;    // finite "minus infinity": exp2 of it is 0, no inf - inf
const int L = int(q_shape[1]);
const int H = int(q_shape[2]) / 2;
const int G = int(k_shape[2]) / 2;
const int lane = TID % 32;
const int warp = TID / 32;
const float lam_v = lam[0];
const float qk_scale = 1.4426950408889634f / SQRT(float(D));   // log2(e) / sqrt(D)
#define LOAD_Q(dst, r0, nrows) \\
  for (int e = TID; e < (nrows) * 2 * D; e += NT) { \\
    const int r = e / (2 * D), m = (e / D) % 2, c = e % D, row = (r0) + r; \\
    dst[e] = MT(row < L ? float(q[idx_t(b) * q_strides[0] + idx_t(row) * q_strides[1] + \\
                                  idx_t(2 * h + m) * q_strides[2] + idx_t(c) * q_strides[3]]) * qk_scale : 0.0f); \\
  }
#define LOAD_K(dst, k0, nkeys) \\
  for (int e = TID; e < 2 * (nkeys) * D; e += NT) { \\
    const int m = e / ((nkeys) * D), j = (e / D) % (nkeys), c = e % D, key = (k0) + j; \\
    dst[e] = MT(key < L ? float(k[idx_t(b) * k_strides[0] + idx_t(key) * k_strides[1] + \\
                                  idx_t(2 * g + m) * k_strides[2] + idx_t(c) * k_strides[3]]) : 0.0f); \\
  }
#define LOAD_V(dst, k0, nkeys) \\
  for (int e = TID; e < (nkeys) * DV; e += NT) { \\
    const int j = e / DV, c = e % DV, key = (k0) + j; \\
    dst[e] = MT(key < L ? float(v[idx_t(b) * v_strides[0] + idx_t(key) * v_strides[1] + \\
                                  idx_t(g) * v_strides[2] + idx_t(c) * v_strides[3]]) : 0.0f); \\
  }
#define LOAD_DO(dst, r0, nrows) \\
  for (int e = TID; e < (nrows) * DV; e += NT) { \\
    const int r = e / DV, c = e % DV, row = (r0) + r; \\
    dst[e] = MT(row < L ? float(dout[idx_t(b) * dout_strides[0] + idx_t(row) * dout_strides[1] + \\
                                     idx_t(h) * dout_strides[2] + idx_t(c) * dout_strides[3]]) : 0.0f); \\
  }
// S (16 x BK) of map m: this warp's scaled query rows against the K tile, into Ss
#define SCORES(Ss, Qs, KVs, m) \\
  for (int n = 0; n < BK / TN; ++n) { \\
    Acc a; \\
    acc_zero(a); \\
    acc_mma<false, true>(a, Qs + warp * RW * 2 * D + (m) * D, 2 * D, KVs + ((m) * BK + n * TN) * D, D, D); \\
    acc_store(a, Ss + (warp * 2 + (m)) * RW * BK + n * TN, BK); \\
  }
// T (16 x BK) = this warp's dO rows against the V tile, into Ts
#define DOV(Ts, dOs, KVs) \\
  for (int n = 0; n < BK / TN; ++n) { \\
    Acc a; \\
    acc_zero(a); \\
    acc_mma<false, true>(a, dOs + warp * RW * DV, DV, KVs + n * TN * DV, DV, DV); \\
    acc_store(a, Ts + warp * RW * BK + n * TN, BK); \\
  }
// One accumulator tile (16 rows from r0, TN columns) out to global memory through this warp's Os
// staging tile: DST is the destination element of (row, c), written as T(value * scale).
#define STORE_TILE(acc, r0, DST, scale) \\
  acc_store(acc, Os + warp * RW * TN, TN); \\
  WARP_SYNC(); \\
  for (int e = lane; e < RW * TN; e += 32) { \\
    const int row = (r0) + e / TN, c = e % TN; \\
    if (row < L) DST = T(Os[warp * RW * TN + e] * (scale)); \\
  } \\
  WARP_SYNC();
"""
# Where the query-side bodies (fwd, dq) stand: one program a block of BQ query rows of one head.
QUERY_BLOCK = """
const int nqb = (L + BQ - 1) / BQ;
const int q0 = (nqb - 1 - BLOCK_X) * BQ;   // longest (most keys) blocks are scheduled first
const int h = BLOCK_Y;
const int b = BLOCK_Z;
const int g = h / (H / G);             // GQA: the kv head this DIFF head reads
const int w0 = q0 + warp * RW;         // this warp's first row
const int sm = lane / 16, sr = lane % 16;   // statistics: lane = (map, row) of this warp
const int crow_s = (w0 + sr < L ? w0 + sr : L - 1);   // padding rows act as the last row
const int n_keys = (q0 + BQ < L ? q0 + BQ : L);       // causal: keys up to the block's last row
"""
UNDEF = """
#undef LOAD_Q
#undef LOAD_K
#undef LOAD_V
#undef LOAD_DO
#undef SCORES
#undef DOV
#undef STORE_TILE
"""

FWD_BODY = COMMON + """
constexpr int BQ = RW * NW;            // query rows per program
SHARED ALIGN32 MT Qs[BQ * 2 * D];      // [row][map][c], scaled into the exp2 domain
SHARED ALIGN32 MT KVs[2 * BK * D];     // the K tile [map][key][c], then the V tile [key][DV]
SHARED ALIGN32 float Ss[NW * 2 * RW * BK];   // per warp: scores [map][row][key]
SHARED ALIGN32 MT Ps[NW * RW * BK];    // per warp: P1 - lam * P2 [row][key]
SHARED ALIGN32 float Os[NW * RW * TN]; // per warp: one output tile on its way out
SHARED float Ms[BQ * 2];               // per row and map: max score
SHARED float Ls[BQ * 2];               // per row and map: 1 / sum

""" + QUERY_BLOCK + """
LOAD_Q(Qs, q0, BQ)
float mx = NEG_BIG, sum = 0.0f;
for (int k0 = 0; k0 < n_keys; k0 += BK) {   // pass 1: each row's max and sum per map
  BARRIER();
  LOAD_K(KVs, k0, BK)
  BARRIER();
  if (k0 <= w0 + RW - 1) {
    SCORES(Ss, Qs, KVs, 0)
    SCORES(Ss, Qs, KVs, 1)
    WARP_SYNC();
    const int base = ((warp * 2 + sm) * RW + sr) * BK;
    float tmax = NEG_BIG;
    for (int j = 0; j < BK; ++j) {
      if (k0 + j <= crow_s) tmax = FMAX(tmax, Ss[base + j]);
    }
    const float mnew = FMAX(mx, tmax);
    float psum = 0.0f;
    for (int j = 0; j < BK; ++j) {
      if (k0 + j <= crow_s) psum += EXP2(Ss[base + j] - mnew);
    }
    sum = sum * EXP2(mx - mnew) + psum;
    mx = mnew;
  }
}
if (w0 + sr < L) lse[((idx_t(b) * L + w0 + sr) * H + h) * 2 + sm] = (mx + LOG2(sum)) * 0.6931471805599453f;
Ms[(warp * RW + sr) * 2 + sm] = mx;
Ls[(warp * RW + sr) * 2 + sm] = 1.0f / sum;
WARP_SYNC();

Acc O[DV / TN];
for (int t = 0; t < DV / TN; ++t) acc_zero(O[t]);
for (int k0 = 0; k0 < n_keys; k0 += BK) {   // pass 2: out += (P1 - lam P2) V
  const bool live = k0 <= w0 + RW - 1;     // a warp skips the tiles its causal mask removes whole
  BARRIER();
  LOAD_K(KVs, k0, BK)
  BARRIER();
  if (live) {
    SCORES(Ss, Qs, KVs, 0)
    SCORES(Ss, Qs, KVs, 1)
    WARP_SYNC();
    for (int e = lane; e < RW * BK; e += 32) {
      const int r = e / BK, key = k0 + e % BK, row = w0 + r, crow = row < L ? row : L - 1;
      const int i = (warp * RW + r) * 2;
      float p = 0.0f;
      if (key <= crow) {
        p = EXP2(Ss[warp * 2 * RW * BK + e] - Ms[i]) * Ls[i]
            - lam_v * EXP2(Ss[(warp * 2 + 1) * RW * BK + e] - Ms[i + 1]) * Ls[i + 1];
      }
      Ps[warp * RW * BK + e] = MT(p);
    }
  }
  BARRIER();
  LOAD_V(KVs, k0, BK)
  BARRIER();
  if (live) {
    for (int t = 0; t < DV / TN; ++t) acc_mma<false, false>(O[t], Ps + warp * RW * BK, BK, KVs + t * TN, DV, BK);
  }
}
for (int t = 0; t < DV / TN; ++t) {
  STORE_TILE(O[t], w0, out[((idx_t(b) * L + row) * H + h) * DV + t * TN + c], 1.0f)
}
""" + UNDEF

DQ_BODY = COMMON + """
constexpr int BQ = RW * NW;
SHARED ALIGN32 MT Qs[BQ * 2 * D];      // [row][map][c], scaled into the exp2 domain
SHARED ALIGN32 MT dOs[BQ * DV];        // [row][DV]
SHARED ALIGN32 MT KVs[2 * BK * D];     // the V tile [key][DV], then the K tile [map][key][c]
SHARED ALIGN32 float Ss[NW * 2 * RW * BK];   // per warp: scores [map][row][key]
SHARED ALIGN32 float Ts[NW * RW * BK];       // per warp: dO . V^T [row][key]
SHARED ALIGN32 MT DSs[NW * 2 * RW * BK];     // per warp: dS [map][row][key]
SHARED ALIGN32 float Os[NW * RW * TN];
SHARED float LSE2[BQ * 2];             // per row and map: lse in the exp2 domain
SHARED float DEL[BQ * 2];              // per row and map: delta

""" + QUERY_BLOCK + """
LOAD_Q(Qs, q0, BQ)
LOAD_DO(dOs, q0, BQ)
for (int e = TID; e < BQ * 2; e += NT) {
  const int row = q0 + e / 2;
  LSE2[e] = row < L ? lse[((idx_t(b) * L + row) * H + h) * 2 + e % 2] * 1.4426950408889634f : 0.0f;
}
float dl = 0.0f;
for (int k0 = 0; k0 < n_keys; k0 += BK) {   // pass 1: delta = rowsum(P * (dO V^T)) per map
  const bool live = k0 <= w0 + RW - 1;
  BARRIER();
  LOAD_K(KVs, k0, BK)
  BARRIER();
  if (live) {
    SCORES(Ss, Qs, KVs, 0)
    SCORES(Ss, Qs, KVs, 1)
  }
  BARRIER();
  LOAD_V(KVs, k0, BK)
  BARRIER();
  if (live) {
    DOV(Ts, dOs, KVs)
    WARP_SYNC();
    const float l2 = LSE2[(warp * RW + sr) * 2 + sm];
    for (int j = 0; j < BK; ++j) {
      if (k0 + j <= crow_s) dl += EXP2(Ss[((warp * 2 + sm) * RW + sr) * BK + j] - l2) * Ts[(warp * RW + sr) * BK + j];
    }
  }
}
DEL[(warp * RW + sr) * 2 + sm] = dl;
if (w0 + sr < L) delta[((idx_t(b) * L + w0 + sr) * H + h) * 2 + sm] = dl;
WARP_SYNC();

Acc dQ[2 * D / TN];                     // [map][column tile]
for (int t = 0; t < 2 * D / TN; ++t) acc_zero(dQ[t]);
for (int k0 = 0; k0 < n_keys; k0 += BK) {   // pass 2: dQ_m += dS_m K_m
  const bool live = k0 <= w0 + RW - 1;
  BARRIER();
  LOAD_V(KVs, k0, BK)
  BARRIER();
  if (live) {
    DOV(Ts, dOs, KVs)
  }
  BARRIER();
  LOAD_K(KVs, k0, BK)
  BARRIER();
  if (live) {
    SCORES(Ss, Qs, KVs, 0)
    SCORES(Ss, Qs, KVs, 1)
    WARP_SYNC();
    for (int e = lane; e < RW * BK; e += 32) {
      const int r = e / BK, key = k0 + e % BK, row = w0 + r, crow = row < L ? row : L - 1;
      const int i = (warp * RW + r) * 2;
      float ds1 = 0.0f, ds2 = 0.0f;
      if (key <= crow) {
        const float t = Ts[warp * RW * BK + e];
        ds1 = EXP2(Ss[warp * 2 * RW * BK + e] - LSE2[i]) * (t - DEL[i]);
        ds2 = -lam_v * EXP2(Ss[(warp * 2 + 1) * RW * BK + e] - LSE2[i + 1]) * (t - DEL[i + 1]);
      }
      DSs[warp * 2 * RW * BK + e] = MT(ds1);
      DSs[(warp * 2 + 1) * RW * BK + e] = MT(ds2);
    }
    WARP_SYNC();
    for (int m = 0; m < 2; ++m) {
      for (int t = 0; t < D / TN; ++t) {
        acc_mma<false, false>(dQ[m * (D / TN) + t], DSs + (warp * 2 + m) * RW * BK, BK, KVs + m * BK * D + t * TN, D, BK);
      }
    }
  }
}
const float inv_sqrt_d = 1.0f / SQRT(float(D));
for (int t = 0; t < 2 * D / TN; ++t) {
  const int m = t / (D / TN), c0 = (t % (D / TN)) * TN;
  STORE_TILE(dQ[t], w0, dq[((idx_t(b) * L + row) * 2 * H + 2 * h + m) * D + c0 + c], inv_sqrt_d)
}
""" + UNDEF

DKDV_BODY = COMMON + """
constexpr int BKV = RW * NW;           // keys per program: 16 a warp
constexpr int BQT = BK;                // query rows a tile
SHARED ALIGN32 MT Ks[BKV * 2 * D];     // [key][map][c]
SHARED ALIGN32 MT Vs[BKV * DV];        // [key][DV]
SHARED ALIGN32 MT Qt[BQT * 2 * D];     // [row][map][c], scaled into the exp2 domain
SHARED ALIGN32 MT dOt[BQT * DV];       // [row][DV]
SHARED ALIGN32 float Ss[NW * 2 * RW * BQT];  // per warp: S^T [map][key][row]
SHARED ALIGN32 float Ts[NW * RW * BQT];      // per warp: (dO V^T)^T [key][row]
SHARED ALIGN32 MT Pc[NW * RW * BQT];         // per warp: (P1 - lam P2)^T [key][row]
SHARED ALIGN32 MT DSt[NW * 2 * RW * BQT];    // per warp: dS^T [map][key][row]
SHARED ALIGN32 float Os[NW * RW * TN];
SHARED float LSE2[BQT * 2];
SHARED float DEL[BQT * 2];

const int k0 = BLOCK_X * BKV;
const int g = BLOCK_Y;
const int b = BLOCK_Z;
const int kw0 = k0 + warp * RW;        // this warp's first key
for (int e = TID; e < BKV * 2 * D; e += NT) {   // [key][map][c]
  const int j = e / (2 * D), m = (e / D) % 2, c = e % D, key = k0 + j;
  Ks[e] = MT(key < L ? float(k[idx_t(b) * k_strides[0] + idx_t(key) * k_strides[1] +
                              idx_t(2 * g + m) * k_strides[2] + idx_t(c) * k_strides[3]]) : 0.0f);
}
LOAD_V(Vs, k0, BKV)

Acc dV[DV / TN], dK[2 * D / TN];
for (int t = 0; t < DV / TN; ++t) acc_zero(dV[t]);
for (int t = 0; t < 2 * D / TN; ++t) acc_zero(dK[t]);
for (int hh = 0; hh < H / G; ++hh) {    // GQA: every query head that reads this kv head
  const int h = g * (H / G) + hh;
  for (int qt0 = (k0 / BQT) * BQT; qt0 < L; qt0 += BQT) {   // causal: rows from the block's first key
    BARRIER();
    LOAD_Q(Qt, qt0, BQT)
    LOAD_DO(dOt, qt0, BQT)
    for (int e = TID; e < BQT * 2; e += NT) {
      const int row = qt0 + e / 2;
      const idx_t at = ((idx_t(b) * L + row) * H + h) * 2 + e % 2;
      LSE2[e] = row < L ? lse[at] * 1.4426950408889634f : 0.0f;
      DEL[e] = row < L ? delta[at] : 0.0f;
    }
    BARRIER();
    if (qt0 + BQT - 1 < kw0 || kw0 >= L) continue;   // no row of the tile sees a key of this warp
    for (int m = 0; m < 2; ++m) {
      for (int n = 0; n < BQT / TN; ++n) {
        Acc a;
        acc_zero(a);
        acc_mma<false, true>(a, Ks + warp * RW * 2 * D + m * D, 2 * D, Qt + n * TN * 2 * D + m * D, 2 * D, D);
        acc_store(a, Ss + (warp * 2 + m) * RW * BQT + n * TN, BQT);
      }
    }
    for (int n = 0; n < BQT / TN; ++n) {
      Acc a;
      acc_zero(a);
      acc_mma<false, true>(a, Vs + warp * RW * DV, DV, dOt + n * TN * DV, DV, DV);
      acc_store(a, Ts + warp * RW * BQT + n * TN, BQT);
    }
    WARP_SYNC();
    for (int e = lane; e < RW * BQT; e += 32) {
      const int key = kw0 + e / BQT, i = e % BQT, row = qt0 + i;
      float p1 = 0.0f, p2 = 0.0f, ds1 = 0.0f, ds2 = 0.0f;
      if (key <= row && row < L) {
        const float t = Ts[warp * RW * BQT + e];
        p1 = EXP2(Ss[warp * 2 * RW * BQT + e] - LSE2[2 * i]);
        p2 = EXP2(Ss[(warp * 2 + 1) * RW * BQT + e] - LSE2[2 * i + 1]);
        ds1 = p1 * (t - DEL[2 * i]);
        ds2 = -lam_v * p2 * (t - DEL[2 * i + 1]);
      }
      Pc[warp * RW * BQT + e] = MT(p1 - lam_v * p2);
      DSt[warp * 2 * RW * BQT + e] = MT(ds1);
      DSt[(warp * 2 + 1) * RW * BQT + e] = MT(ds2);
    }
    WARP_SYNC();
    for (int t = 0; t < DV / TN; ++t) acc_mma<false, false>(dV[t], Pc + warp * RW * BQT, BQT, dOt + t * TN, DV, BQT);
    for (int m = 0; m < 2; ++m) {
      for (int t = 0; t < D / TN; ++t) {
        acc_mma<false, false>(dK[m * (D / TN) + t], DSt + (warp * 2 + m) * RW * BQT, BQT, Qt + m * D + t * TN, 2 * D, BQT);
      }
    }
  }
}
// Qt held q * log2(e) / sqrt(D): dK = dS^T q / sqrt(D) = (dS^T Qt) * ln 2
for (int t = 0; t < DV / TN; ++t) {   // rows of these tiles are keys
  STORE_TILE(dV[t], kw0, dv[((idx_t(b) * L + row) * G + g) * DV + t * TN + c], 1.0f)
}
for (int t = 0; t < 2 * D / TN; ++t) {
  const int m = t / (D / TN), c0 = (t % (D / TN)) * TN;
  STORE_TILE(dK[t], kw0, dk[((idx_t(b) * L + row) * 2 * G + 2 * g + m) * D + c0 + c], 0.6931471805599453f)
}
""" + UNDEF

BODIES = {"fwd": FWD_BODY, "dq": DQ_BODY, "dkdv": DKDV_BODY}
INPUTS = {"fwd": ["q", "k", "v", "lam"], "dq": ["q", "k", "v", "lam", "dout", "lse"],
          "dkdv": ["q", "k", "v", "lam", "dout", "lse", "delta"]}
OUTPUTS = {"fwd": ["out", "lse"], "dq": ["dq", "delta"], "dkdv": ["dk", "dv"]}
TILE = {"metal": 8, "cuda": 16}         # TN = TK of each dialect's tile interface
BUDGET = {"metal": 32768, "cuda": 49152}   # threadgroup memory / static shared memory, bytes
_SHARED = re.compile(r"SHARED (?:ALIGN32 )?(MT|float) (\w+)\[([^\]]+)\];")


def parameters(name: str) -> list[tuple[str, str]]:
    """(parameter, role) of kernel `name` as MLX's custom kernels derive them: each input ("input"),
    its _shape ("shape") and _strides ("strides") where the body names them, then each output."""
    body, out = BODIES[name], []
    for arg in INPUTS[name]:
        out.append((arg, "input"))
        out += [(f"{arg}_{role}", role) for role in ("shape", "strides") if f"{arg}_{role}" in body]
    return out + [(arg, "output") for arg in OUTPUTS[name]]


def shared_bytes(name: str, head_dim: int, nw: int, bk: int, tn: int, mt_bytes: int) -> int:
    """The shared memory the body `name` declares, its array sizes evaluated at these constants."""
    env = dict(D=head_dim, DV=2 * head_dim, NW=nw, BK=bk, TN=tn, RW=16, BQ=16 * nw, BKV=16 * nw, BQT=bk)
    return sum(eval(size, {}, env) * (mt_bytes if kind == "MT" else 4)  # noqa: S307 - our own source
               for kind, _, size in _SHARED.findall(BODIES[name]))


def tile_config(name: str, head_dim: int, dialect: str, itemsize: int, tn: int | None = None,
                budget: int | None = None) -> tuple[int, int]:
    """(NW, BK) for kernel `name`: the most warps, then the widest key (dkdv: query) tile, whose
    shared memory fits the dialect's budget. Metal stages operands as float."""
    tn = tn or TILE[dialect]
    budget = budget or BUDGET.get(dialect, BUDGET["cuda"])
    mt_bytes = 4 if dialect == "metal" else itemsize
    if head_dim % tn:
        raise ValueError(f"the fused DIFF V1 kernels need head_dim a multiple of {tn} on {dialect}, got {head_dim}")
    for nw in (4, 2, 1):
        for bk in (32, 16, 8):
            if bk % tn == 0 and shared_bytes(name, head_dim, nw, bk, tn, mt_bytes) <= budget:
                return nw, bk
    raise ValueError(f"head_dim={head_dim} does not fit the {dialect} {name} kernel's shared memory")


def source(name: str, dialect: str) -> tuple[str, str]:
    """(header, source) of kernel `name` in one dialect ("metal", "cuda" or "cpu")."""
    header, entry = {"metal": (METAL_HEADER, METAL_ENTRY), "cuda": (CUDA_HEADER, CUDA_ENTRY),
                     "cpu": (CPU_HEADER, CPU_ENTRY)}[dialect]
    return header, entry + BODIES[name]


def fingerprint() -> str:
    """A hash of every body and prelude: what a measurement of these kernels was taken on."""
    text = "".join([METAL_HEADER, CUDA_HEADER, CPU_HEADER, METAL_ENTRY, CUDA_ENTRY, *BODIES.values()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
