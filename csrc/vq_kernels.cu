// CUDA kernels of the VQ op family (see vq_kernels.h for the contracts).
//
// One tiling serves all four ops: a block of 256 threads owns a tile of 64 rows (or, for grad_codebook, 64 codes)
// and streams the other operand through shared memory in 64 x 32 (items x features) tiles. Thread (ty, tx),
// ty = tid / 16, tx = tid % 16, owns the 4 x 4 fp32 register tile of rows ty*4 .. ty*4+3 and codes
// tx*4 .. tx*4+3 of each (row tile, code tile) pair, so the 16 lanes tx of a half-warp share rows and per-row
// reductions are 16-lane shuffles in a fixed butterfly order (deterministic, no atomics anywhere).
// When D <= 32 the resident operand (the block's own rows, or its own codes) is loaded into shared memory once.
//
// NOTE: this is plain SIMT fp32 FMA code, chosen to be clearly correct first. The tensor-core version
// (tf32x3 / bf16x3 mma.sync, cp.async double buffering, packed (value, index) argmin) is the tuning step of the
// GPU bring-up issue; its results must stay within the same ties/tolerance contract.
#include "vq_kernels.h"

namespace dera_fast::vq {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 16;          // threads sharing a row of the register tile
constexpr int kTile = 64;           // rows per row tile = codes per code tile
constexpr int kPer = kTile / kLanes;  // 4: rows (and codes) per thread
constexpr int kTileDim = 32;        // features per shared-memory tile
constexpr int kStride = kTile + 4;  // padded tile row (keeps float4 alignment, spreads the transposing stores)
constexpr int kOutDim = 32;         // output features per pass of the backward's second product
constexpr int kOutPer = kOutDim / kLanes;  // 2
constexpr unsigned kFull = 0xffffffffu;

typedef float Tile[kTileDim][kStride];

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// tile[d][r] = src[(r0 + r) * D + d0 + d], zero outside rows [0, n) and features [0, D).
template <typename T>
__device__ __forceinline__ void load_tile(Tile& tile, const T* __restrict__ src, int64_t r0, int64_t n, int64_t d0,
                                          int64_t D) {
  for (int i = threadIdx.x; i < kTile * kTileDim; i += kThreads) {
    const int r = i / kTileDim, d = i % kTileDim;  // d fastest: coalesced global reads
    const int64_t gr = r0 + r, gd = d0 + d;
    tile[d][r] = (gr < n && gd < D) ? to_float(src[gr * D + gd]) : 0.0f;
  }
}

// acc[i][j] = <A[a0 + ty*4 + i], B[b0 + tx*4 + j]> over all D features, in fp32 with a fixed FMA order.
// With D <= kTileDim a caller may pass load_a / load_b = false when that tile already holds its operand.
template <typename TA, typename TB>
__device__ __forceinline__ void dot_tiles(const TA* __restrict__ A, int64_t a0, int64_t na,
                                          const TB* __restrict__ B, int64_t b0, int64_t nb, int64_t D, Tile& a_s,
                                          Tile& b_s, bool load_a, bool load_b, float (&acc)[kPer][kPer]) {
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = 0.0f;
  for (int64_t d0 = 0; d0 < D; d0 += kTileDim) {
    __syncthreads();  // every thread is done with the previous tiles (and with any smem its caller read)
    if (load_a) load_tile(a_s, A, a0, na, d0, D);
    if (load_b) load_tile(b_s, B, b0, nb, d0, D);
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kTileDim; ++d) {
      const float4 av = *reinterpret_cast<const float4*>(&a_s[d][ty * kPer]);
      const float4 bv = *reinterpret_cast<const float4*>(&b_s[d][tx * kPer]);
      const float a[kPer] = {av.x, av.y, av.z, av.w};
      const float b[kPer] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
}

// Online softmax accumulation: (m, s) -> running max and sum of exp(l - m).
__device__ __forceinline__ void online_add(float& m, float& s, float l) {
  if (l > m) {
    s = s * __expf(m - l) + 1.0f;
    m = l;
  } else if (l != neg_inf()) {
    s += __expf(l - m);
  }
}

// Merges the (m, s) pairs of the 16 lanes of a row; the combine is symmetric, so all lanes end bitwise equal.
__device__ __forceinline__ void merge_softmax(float& m, float& s) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) {
    const float om = __shfl_xor_sync(kFull, m, off, kLanes);
    const float os = __shfl_xor_sync(kFull, s, off, kLanes);
    const float nm = fmaxf(m, om);
    s = nm == neg_inf() ? 0.0f : s * __expf(m - nm) + os * __expf(om - nm);
    m = nm;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// vq_nearest: score = bias[k] - 2 <z, c_k>, running (score, k) minimum per row, first index on ties.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vq_nearest_kernel(const T* __restrict__ z, const float* __restrict__ codebook, const float* __restrict__ bias,
                      int64_t* __restrict__ ids, int64_t N, int64_t K, int64_t D) {
  __shared__ __align__(16) Tile z_s;
  __shared__ __align__(16) Tile c_s;
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool resident = D <= kTileDim;
  float best[kPer];
  int best_k[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    best[i] = pos_inf();
    best_k[i] = static_cast<int>(K);  // "none yet": larger than every real index
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    float acc[kPer][kPer];
    dot_tiles(z, n0, N, codebook, k0, K, D, z_s, c_s, !resident || k0 == 0, true, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {  // codes in increasing order: strict < keeps the first of equal scores
      const int64_t k = k0 + tx * kPer + j;
      if (k < K) {
        const float bk = bias[k];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float s = fmaf(-2.0f, acc[i][j], bk);
          if (s < best[i]) {
            best[i] = s;
            best_k[i] = static_cast<int>(k);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) {  // lexicographic (score, k) minimum: lowest k among equals
      const float ov = __shfl_xor_sync(kFull, best[i], off, kLanes);
      const int ok = __shfl_xor_sync(kFull, best_k[i], off, kLanes);
      if (ov < best[i] || (ov == best[i] && ok < best_k[i])) {
        best[i] = ov;
        best_k[i] = ok;
      }
    }
    const int64_t n = n0 + ty * kPer + i;
    if (tx == 0 && n < N) ids[n] = best_k[i] < K ? best_k[i] : 0;  // 0 when every score is NaN
  }
}

// ---------------------------------------------------------------------------------------------------------------
// vq_sample: exact two-pass inverse CDF. Pass 1: online max / sum of exp of the logits. Pass 2: the same logits
// in the same code order, running cumulative sum; the first k whose cumulative sum exceeds u * total (strictly, so
// a zero-probability code is never drawn, as torch.searchsorted(..., right=True)); if rounding never gets there,
// the last code with non-zero probability. Both passes round the logit the same way (__fmul_rn: no FMA contraction)
// so the largest probability is exactly 1 in both.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vq_sample_kernel(const T* __restrict__ z, const float* __restrict__ codebook, const float* __restrict__ u,
                     float inv_temperature, int64_t* __restrict__ ids, int64_t N, int64_t K, int64_t D) {
  __shared__ __align__(16) Tile z_s;
  __shared__ __align__(16) Tile c_s;
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool resident = D <= kTileDim;

  float scale[kPer];  // inv_temperature / max(|z_n|, 1e-12): the logits are cosines / temperature
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t n = n0 + ty * kPer + i;
    float ss = 0.0f;
    if (n < N)
      for (int64_t d = tx; d < D; d += kLanes) {
        const float v = to_float(z[n * D + d]);
        ss = fmaf(v, v, ss);
      }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) ss += __shfl_xor_sync(kFull, ss, off, kLanes);
    scale[i] = inv_temperature / fmaxf(sqrtf(ss), 1e-12f);
  }

  float m[kPer], total[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    m[i] = neg_inf();
    total[i] = 0.0f;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {  // pass 1
    float acc[kPer][kPer];
    dot_tiles(z, n0, N, codebook, k0, K, D, z_s, c_s, !resident || k0 == 0, true, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (k0 + tx * kPer + j < K)
#pragma unroll
        for (int i = 0; i < kPer; ++i) online_add(m[i], total[i], __fmul_rn(acc[i][j], scale[i]));
  }

  float target[kPer], run[kPer];
  int found[kPer], last_nz[kPer];
  bool done = true;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    merge_softmax(m[i], total[i]);
    const int64_t n = n0 + ty * kPer + i;
    target[i] = n < N ? u[n] * total[i] : 0.0f;
    run[i] = 0.0f;
    found[i] = -1;
    last_nz[i] = -1;
    done = done && n >= N;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {  // pass 2
    if (__syncthreads_and(done)) break;          // block-uniform early exit once every row has its sample
    float acc[kPer][kPer];
    dot_tiles(z, n0, N, codebook, k0, K, D, z_s, c_s, !resident, true, acc);  // z tile kept from pass 1
    done = true;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      float p[kPer], mine = 0.0f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        p[j] = k0 + tx * kPer + j < K ? __expf(__fmul_rn(acc[i][j], scale[i]) - m[i]) : 0.0f;
        mine += p[j];
      }
      float incl = mine;  // inclusive prefix sum over the 16 lanes = codes of this tile in increasing order
#pragma unroll
      for (int off = 1; off < kLanes; off *= 2) {
        const float o = __shfl_up_sync(kFull, incl, off, kLanes);
        if (tx >= off) incl += o;
      }
      const float excl = __shfl_up_sync(kFull, incl, 1, kLanes);
      const float tile_sum = __shfl_sync(kFull, incl, kLanes - 1, kLanes);
      float c = run[i] + (tx == 0 ? 0.0f : excl);
      int cand = kTile * 2, nz = -1;  // tile-local code offsets
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        c += p[j];
        if (cand == kTile * 2 && p[j] > 0.0f && c > target[i]) cand = tx * kPer + j;
        if (p[j] > 0.0f) nz = tx * kPer + j;
      }
#pragma unroll
      for (int off = kLanes / 2; off > 0; off /= 2) {
        cand = min(cand, __shfl_xor_sync(kFull, cand, off, kLanes));
        nz = max(nz, __shfl_xor_sync(kFull, nz, off, kLanes));
      }
      if (found[i] < 0 && cand < kTile * 2) found[i] = static_cast<int>(k0) + cand;
      if (nz >= 0) last_nz[i] = static_cast<int>(k0) + nz;
      run[i] += tile_sum;
      done = done && (found[i] >= 0 || n0 + ty * kPer + i >= N);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t n = n0 + ty * kPer + i;
    if (tx == 0 && n < N) ids[n] = found[i] >= 0 ? found[i] : (last_nz[i] >= 0 ? last_nz[i] : 0);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// codebook_ce_fwd: online log-sum-exp over the codes plus a gather of the target logit.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_fwd_kernel(const T* __restrict__ h, const T* __restrict__ codebook, const int64_t* __restrict__ target,
                  float inv_temperature, float* __restrict__ loss, float* __restrict__ lse, int64_t N, int64_t K,
                  int64_t D) {
  __shared__ __align__(16) Tile h_s;
  __shared__ __align__(16) Tile c_s;
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool resident = D <= kTileDim;
  float m[kPer], s[kPer], lt[kPer];
  int64_t t[kPer];
  int hit[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t n = n0 + ty * kPer + i;
    t[i] = n < N ? target[n] : -1;
    m[i] = neg_inf();
    s[i] = 0.0f;
    lt[i] = 0.0f;
    hit[i] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    float acc[kPer][kPer];
    dot_tiles(h, n0, N, codebook, k0, K, D, h_s, c_s, !resident || k0 == 0, true, acc);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t k = k0 + tx * kPer + j;
      if (k < K)
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float l = acc[i][j] * inv_temperature;
          online_add(m[i], s[i], l);
          if (k == t[i]) {
            lt[i] = l;
            hit[i] = 1;
          }
        }
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    merge_softmax(m[i], s[i]);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) {  // exactly one lane holds the target logit: sum with zeros
      lt[i] += __shfl_xor_sync(kFull, lt[i], off, kLanes);
      hit[i] |= __shfl_xor_sync(kFull, hit[i], off, kLanes);
    }
    const int64_t n = n0 + ty * kPer + i;
    if (tx == 0 && n < N) {
      const float l = m[i] + __logf(s[i]);
      lse[n] = l;
      loss[n] = hit[i] ? l - lt[i] : __int_as_float(0x7fc00000);  // NaN for an out-of-range target
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// codebook_ce_bwd. w[n, k] = (exp(l - lse[n]) - [k == t[n]]) * g[n] * inv_T is recomputed per tile and staged in
// shared memory, then multiplied with a 32-feature slice of the other operand. The logits are recomputed once
// per 32 output features (ceil(D / 32) passes; one pass for LARP's D = 16).
// ---------------------------------------------------------------------------------------------------------------
struct BwdSmem {
  __align__(16) Tile a;             // h tile
  __align__(16) Tile b;             // code tile
  float w[kTile][kTile + 1];        // w[row][code]
  float o[kTile][kOutDim + 4];      // features [o0, o0 + 32) of the streamed operand
};

__device__ __forceinline__ float ce_weight(float acc, float inv_temperature, float lse, float coef, int64_t k,
                                           int64_t t) {
  const float p = __expf(acc * inv_temperature - lse);
  return (k == t ? p - 1.0f : p) * coef;
}

// grad_h: a block owns 64 rows and streams every code tile.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_bwd_h_kernel(const float* __restrict__ grad_loss, const T* __restrict__ h, const T* __restrict__ codebook,
                    const int64_t* __restrict__ target, const float* __restrict__ lse, float inv_temperature,
                    float* __restrict__ grad_h, int64_t N, int64_t K, int64_t D) {
  __shared__ BwdSmem sm;
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool resident = D <= kTileDim;
  float row_lse[kPer], coef[kPer];
  int64_t t[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t n = n0 + ty * kPer + i;
    const bool ok = n < N;
    row_lse[i] = ok ? lse[n] : 0.0f;
    coef[i] = ok ? grad_loss[n] * inv_temperature : 0.0f;
    t[i] = ok ? target[n] : -1;
  }
  for (int64_t o0 = 0; o0 < D; o0 += kOutDim) {
    float out[kPer][kOutPer] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      float acc[kPer][kPer];
      dot_tiles(h, n0, N, codebook, k0, K, D, sm.a, sm.b, !resident || (o0 == 0 && k0 == 0), true, acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int64_t k = k0 + tx * kPer + j;
          sm.w[ty * kPer + i][tx * kPer + j] =
              (n0 + ty * kPer + i < N && k < K) ? ce_weight(acc[i][j], inv_temperature, row_lse[i], coef[i], k, t[i])
                                                : 0.0f;
        }
      for (int e = threadIdx.x; e < kTile * kOutDim; e += kThreads) {
        const int c = e / kOutDim, o = e % kOutDim;
        const int64_t k = k0 + c, f = o0 + o;
        sm.o[c][o] = (k < K && f < D) ? to_float(codebook[k * D + f]) : 0.0f;
      }
      __syncthreads();
      for (int c = 0; c < kTile; ++c)
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float w = sm.w[ty * kPer + i][c];
#pragma unroll
          for (int j = 0; j < kOutPer; ++j) out[i][j] = fmaf(w, sm.o[c][tx * kOutPer + j], out[i][j]);
        }
      // the next dot_tiles starts with __syncthreads(), so sm.w / sm.o are not overwritten while being read
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t n = n0 + ty * kPer + i;
#pragma unroll
      for (int j = 0; j < kOutPer; ++j) {
        const int64_t f = o0 + tx * kOutPer + j;
        if (n < N && f < D) grad_h[n * D + f] = out[i][j];
      }
    }
  }
}

// grad_codebook: a block owns 64 codes and streams every row tile (no atomics: each code has one owner block).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_bwd_codebook_kernel(const float* __restrict__ grad_loss, const T* __restrict__ h,
                           const T* __restrict__ codebook, const int64_t* __restrict__ target,
                           const float* __restrict__ lse, float inv_temperature, float* __restrict__ grad_codebook,
                           int64_t N, int64_t K, int64_t D) {
  __shared__ BwdSmem sm;
  const int ty = threadIdx.x / kLanes, tx = threadIdx.x % kLanes;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const bool resident = D <= kTileDim;
  for (int64_t o0 = 0; o0 < D; o0 += kOutDim) {
    float out[kPer][kOutPer] = {};  // codes k0 + ty*4 + i, features o0 + tx*2 + j
    for (int64_t n0 = 0; n0 < N; n0 += kTile) {
      float acc[kPer][kPer];
      dot_tiles(h, n0, N, codebook, k0, K, D, sm.a, sm.b, true, !resident || (o0 == 0 && n0 == 0), acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t n = n0 + ty * kPer + i;
        const bool ok = n < N;
        const float row_lse = ok ? lse[n] : 0.0f;
        const float coef = ok ? grad_loss[n] * inv_temperature : 0.0f;
        const int64_t t = ok ? target[n] : -1;
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int64_t k = k0 + tx * kPer + j;
          sm.w[ty * kPer + i][tx * kPer + j] =
              (ok && k < K) ? ce_weight(acc[i][j], inv_temperature, row_lse, coef, k, t) : 0.0f;
        }
      }
      for (int e = threadIdx.x; e < kTile * kOutDim; e += kThreads) {
        const int r = e / kOutDim, o = e % kOutDim;
        const int64_t n = n0 + r, f = o0 + o;
        sm.o[r][o] = (n < N && f < D) ? to_float(h[n * D + f]) : 0.0f;
      }
      __syncthreads();
      for (int r = 0; r < kTile; ++r)
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float w = sm.w[r][ty * kPer + i];
#pragma unroll
          for (int j = 0; j < kOutPer; ++j) out[i][j] = fmaf(w, sm.o[r][tx * kOutPer + j], out[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t k = k0 + ty * kPer + i;
#pragma unroll
      for (int j = 0; j < kOutPer; ++j) {
        const int64_t f = o0 + tx * kOutPer + j;
        if (k < K && f < D) grad_codebook[k * D + f] = out[i][j];
      }
    }
  }
}

inline dim3 tiles(int64_t n) { return dim3(static_cast<unsigned>((n + kTile - 1) / kTile)); }

}  // namespace

template <typename T>
cudaError_t vq_nearest(const T* z, const float* codebook, const float* bias, int64_t* ids, int64_t N, int64_t K,
                       int64_t D, cudaStream_t stream) {
  if (N == 0 || K == 0) return cudaSuccess;
  vq_nearest_kernel<T><<<tiles(N), kThreads, 0, stream>>>(z, codebook, bias, ids, N, K, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t vq_sample(const T* z, const float* codebook, const float* u, float inv_temperature, int64_t* ids,
                      int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  if (N == 0 || K == 0) return cudaSuccess;
  vq_sample_kernel<T><<<tiles(N), kThreads, 0, stream>>>(z, codebook, u, inv_temperature, ids, N, K, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t codebook_ce_fwd(const T* h, const T* codebook, const int64_t* target, float inv_temperature,
                            float* loss, float* lse, int64_t N, int64_t K, int64_t D, cudaStream_t stream) {
  if (N == 0 || K == 0) return cudaSuccess;
  ce_fwd_kernel<T><<<tiles(N), kThreads, 0, stream>>>(h, codebook, target, inv_temperature, loss, lse, N, K, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t codebook_ce_bwd(const float* grad_loss, const T* h, const T* codebook, const int64_t* target,
                            const float* lse, float inv_temperature, float* grad_h, float* grad_codebook, int64_t N,
                            int64_t K, int64_t D, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  if (N > 0) {
    ce_bwd_h_kernel<T><<<tiles(N), kThreads, 0, stream>>>(grad_loss, h, codebook, target, lse, inv_temperature,
                                                          grad_h, N, K, D);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ce_bwd_codebook_kernel<T><<<tiles(K), kThreads, 0, stream>>>(grad_loss, h, codebook, target, lse,
                                                               inv_temperature, grad_codebook, N, K, D);
  return cudaGetLastError();
}

#define DERA_VQ_INSTANTIATE(T)                                                                                  \
  template cudaError_t vq_nearest<T>(const T*, const float*, const float*, int64_t*, int64_t, int64_t, int64_t, \
                                     cudaStream_t);                                                             \
  template cudaError_t vq_sample<T>(const T*, const float*, const float*, float, int64_t*, int64_t, int64_t,   \
                                    int64_t, cudaStream_t);                                                     \
  template cudaError_t codebook_ce_fwd<T>(const T*, const T*, const int64_t*, float, float*, float*, int64_t,  \
                                          int64_t, int64_t, cudaStream_t);                                      \
  template cudaError_t codebook_ce_bwd<T>(const float*, const T*, const T*, const int64_t*, const float*, float, \
                                          float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
DERA_VQ_INSTANTIATE(float)
DERA_VQ_INSTANTIATE(__half)
DERA_VQ_INSTANTIATE(__nv_bfloat16)
#undef DERA_VQ_INSTANTIATE

}  // namespace dera_fast::vq
