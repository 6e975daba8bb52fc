"""The fused DIFF V1 forward kernel, written once: BODY plus one small prelude per dialect.

One program (threadgroup / CUDA block) handles BQ query rows of one DIFF head of one batch
element. Per tile of BK = 16 keys it loads the kv head's two key sub-heads into shared
memory, computes both maps' scores at once (lanes 0-15 hold map 1's 16 keys, lanes 16-31
map 2's), updates an online softmax per map (reductions inside each half of the SIMD
group / warp), then loads the V tile once and accumulates both maps' outputs from it.
The epilogue combines o1/l1 - lam * o2/l2 and writes the log-sum-exp of each map.

Inputs q (B, L, 2H, D), k (B, L, 2G, D), v (B, L, G, 2D) may be strided views (their
strides are read), lam has one float32. Outputs out (B, L, H, 2D) and lse (B, L, H, 2).
Template constants: T (input dtype), D, BQ (query rows per program), NW (SIMD groups).
"""

# Dialect preludes: everything the body needs that Metal and CUDA spell differently.
# ENTRY is prepended to the body (Metal only passes thread attributes that the body names).
METAL_HEADER = """
#define SHARED threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define WARP_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
#define SHFL_XOR(x, m) simd_shuffle_xor((x), ushort(m))
#define EXP2(x) metal::exp2(x)
#define LOG2(x) metal::log2(x)
#define SQRT(x) metal::sqrt(x)
#define FMAX(a, b) metal::max((a), (b))
typedef int64_t idx_t;
"""
METAL_ENTRY = """
const int TID = int(thread_position_in_threadgroup.x);
const int BLOCK_X = int(threadgroup_position_in_grid.x);
const int BLOCK_Y = int(threadgroup_position_in_grid.y);
const int BLOCK_Z = int(threadgroup_position_in_grid.z);
"""

CUDA_HEADER = """
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define WARP_SYNC() __syncwarp()
#define SHFL_XOR(x, m) __shfl_xor_sync(0xffffffffu, (x), (m))
#define EXP2(x) exp2f(x)
#define LOG2(x) log2f(x)
#define SQRT(x) sqrtf(x)
#define FMAX(a, b) fmaxf((a), (b))
typedef long long idx_t;
"""
CUDA_ENTRY = """
const int TID = int(threadIdx.x);
const int BLOCK_X = int(blockIdx.x);
const int BLOCK_Y = int(blockIdx.y);
const int BLOCK_Z = int(blockIdx.z);
"""

BODY = """
constexpr int BK = 16;                 // keys per tile: one per half-SIMD lane
constexpr int NT = NW * 32;            // threads per program
constexpr int R = BQ / NW;             // query rows per SIMD group
constexpr int DV = 2 * D;              // value / output width
constexpr int NC = (DV + 31) / 32;     // output columns per lane
constexpr int KSTRIDE = D + 1;         // padded key rows: lanes read different rows, no bank conflict
constexpr float NEG_BIG = -1.0e30f;    // finite "minus infinity": exp2 of it is 0, no inf - inf

SHARED float Qs[BQ * 2 * D];           // q rows of both maps, pre-scaled into the exp2 domain
SHARED float KVs[2 * BK * KSTRIDE];    // the K tile, then the V tile (2*BK*KSTRIDE >= BK*DV)
SHARED float Ps[BQ * 32];              // probabilities of the tile: [row][map*16 + key]
SHARED float As[BQ * 2];               // rescale factors of the tile: [row][map]
SHARED float Ls[BQ * 4];               // epilogue: [row][l1, l2, lse1, lse2]

const int L = int(q_shape[1]);
const int H = int(q_shape[2]) / 2;
const int G = int(k_shape[2]) / 2;
const int lane = TID % 32;
const int warp = TID / 32;
const int map = lane / 16;             // which softmax map this lane scores
const int jj = lane % 16;              // which key of the tile this lane scores
const int nqb = (L + BQ - 1) / BQ;
const int q0 = (nqb - 1 - BLOCK_X) * BQ;   // longest (most keys) blocks are scheduled first
const int h = BLOCK_Y;
const int b = BLOCK_Z;
const int g = h / (H / G);             // GQA: the kv head this DIFF head reads
const float qk_scale = 1.4426950408889634f / SQRT(float(D));   // log2(e) / sqrt(D)

for (int e = TID; e < BQ * 2 * D; e += NT) {
  const int r = e / (2 * D), m = (e / D) % 2, c = e % D;
  const int row = q0 + r;
  float val = 0.0f;
  if (row < L) {
    val = float(q[idx_t(b) * q_strides[0] + idx_t(row) * q_strides[1] + idx_t(2 * h + m) * q_strides[2] + idx_t(c) * q_strides[3]]);
  }
  Qs[e] = val * qk_scale;
}

float mrow[R], lrow[R];                // running max / sum of this lane's map, per row
float o1[R][NC], o2[R][NC];            // unnormalised outputs of map 1 and map 2
#pragma unroll
for (int rr = 0; rr < R; ++rr) {
  mrow[rr] = NEG_BIG;
  lrow[rr] = 0.0f;
#pragma unroll
  for (int t = 0; t < NC; ++t) { o1[rr][t] = 0.0f; o2[rr][t] = 0.0f; }
}

const int n_keys = (q0 + BQ < L ? q0 + BQ : L);   // causal: keys up to the block's last row
for (int k0 = 0; k0 < n_keys; k0 += BK) {
  BARRIER();
  for (int e = TID; e < 2 * BK * D; e += NT) {
    const int m = e / (BK * D), j = (e / D) % BK, c = e % D;
    const int key = k0 + j;
    float val = 0.0f;
    if (key < L) {
      val = float(k[idx_t(b) * k_strides[0] + idx_t(key) * k_strides[1] + idx_t(2 * g + m) * k_strides[2] + idx_t(c) * k_strides[3]]);
    }
    KVs[(m * BK + j) * KSTRIDE + c] = val;
  }
  BARRIER();

  float s[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) s[rr] = 0.0f;
  for (int c = 0; c < D; ++c) {
    const float kc = KVs[(map * BK + jj) * KSTRIDE + c];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) s[rr] += Qs[((warp * R + rr) * 2 + map) * D + c] * kc;
  }
  const int key = k0 + jj;
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int row = q0 + warp * R + rr;
    const int crow = row < L ? row : L - 1;   // padding rows behave as the last row, never written
    const float sv = key <= crow ? s[rr] : NEG_BIG;
    float tmax = sv;
    tmax = FMAX(tmax, SHFL_XOR(tmax, 8));
    tmax = FMAX(tmax, SHFL_XOR(tmax, 4));
    tmax = FMAX(tmax, SHFL_XOR(tmax, 2));
    tmax = FMAX(tmax, SHFL_XOR(tmax, 1));
    const float mnew = FMAX(mrow[rr], tmax);
    const float p = EXP2(sv - mnew);
    const float alpha = EXP2(mrow[rr] - mnew);
    float psum = p;
    psum += SHFL_XOR(psum, 8);
    psum += SHFL_XOR(psum, 4);
    psum += SHFL_XOR(psum, 2);
    psum += SHFL_XOR(psum, 1);
    lrow[rr] = lrow[rr] * alpha + psum;
    mrow[rr] = mnew;
    Ps[(warp * R + rr) * 32 + lane] = p;
    if (jj == 0) As[(warp * R + rr) * 2 + map] = alpha;
  }
  BARRIER();   // every group is done with the K tile; P and alpha are visible

  for (int e = TID; e < BK * DV; e += NT) {
    const int j = e / DV, c = e % DV;
    const int key = k0 + j;
    float val = 0.0f;
    if (key < L) {
      val = float(v[idx_t(b) * v_strides[0] + idx_t(key) * v_strides[1] + idx_t(g) * v_strides[2] + idx_t(c) * v_strides[3]]);
    }
    KVs[e] = val;
  }
  BARRIER();

#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const float a1 = As[(warp * R + rr) * 2], a2 = As[(warp * R + rr) * 2 + 1];
#pragma unroll
    for (int t = 0; t < NC; ++t) { o1[rr][t] *= a1; o2[rr][t] *= a2; }
  }
  for (int j = 0; j < BK; ++j) {
    float vv[NC];
#pragma unroll
    for (int t = 0; t < NC; ++t) {
      const int c = lane + 32 * t;
      vv[t] = c < DV ? KVs[j * DV + c] : 0.0f;
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const float p1 = Ps[(warp * R + rr) * 32 + j];
      const float p2 = Ps[(warp * R + rr) * 32 + 16 + j];
#pragma unroll
      for (int t = 0; t < NC; ++t) { o1[rr][t] += p1 * vv[t]; o2[rr][t] += p2 * vv[t]; }
    }
  }
}

// epilogue: out = o1 / l1 - lam * o2 / l2; lse in natural log units of the scaled scores
#pragma unroll
for (int rr = 0; rr < R; ++rr) {
  if (jj == 0) {
    Ls[(warp * R + rr) * 4 + map] = lrow[rr];
    Ls[(warp * R + rr) * 4 + 2 + map] = (mrow[rr] + LOG2(lrow[rr])) * 0.6931471805599453f;
  }
}
WARP_SYNC();
const float lam_v = lam[0];
#pragma unroll
for (int rr = 0; rr < R; ++rr) {
  const int row = q0 + warp * R + rr;
  if (row < L) {
    const float inv1 = 1.0f / Ls[(warp * R + rr) * 4];
    const float inv2 = lam_v / Ls[(warp * R + rr) * 4 + 1];
    const idx_t base = ((idx_t(b) * L + row) * H + h) * DV;
#pragma unroll
    for (int t = 0; t < NC; ++t) {
      const int c = lane + 32 * t;
      if (c < DV) out[base + c] = T(o1[rr][t] * inv1 - o2[rr][t] * inv2);
    }
    if (lane < 2) lse[((idx_t(b) * L + row) * H + h) * 2 + lane] = Ls[(warp * R + rr) * 4 + 2 + lane];
  }
}
"""


def tile_config(head_dim: int, dialect: str) -> tuple[int, int]:
    """(BQ, NW): the most query rows per program whose shared memory fits the dialect's
    budget (Metal threadgroup memory 32 KiB; CUDA static shared memory 48 KiB)."""
    budget = 32768 if dialect == "metal" else 49152
    nw = 4
    for bq in (32, 16, 8, 4):
        floats = bq * 2 * head_dim + 2 * 16 * (head_dim + 1) + bq * 32 + bq * 2 + bq * 4
        if floats * 4 <= budget and bq // nw <= 8:
            return bq, nw
    raise ValueError(f"head_dim={head_dim} is too large for the fused DIFF V1 kernel")


def source(dialect: str) -> tuple[str, str]:
    """(header, source) of the kernel in one dialect."""
    if dialect == "metal":
        return METAL_HEADER, METAL_ENTRY + BODY
    if dialect == "cuda":
        return CUDA_HEADER, CUDA_ENTRY + BODY
    raise ValueError(f"unknown kernel dialect {dialect!r}")
