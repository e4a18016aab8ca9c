// Device-side building blocks shared by attention_kernels.cu (forward) and attention_kernels_bwd.cu (backward):
// conversions, warp reductions, warp-level tile GEMMs, tile loads. Only for nvcc; everything sits in an anonymous
// namespace, so each .cu gets its own private copy.
// The hardware-specific pieces live in two headers of their own, included with angle brackets ON PURPOSE: they are
// resolved through the include path (-I csrc), so tests/cuda_emu/ supplies CPU versions of exactly these two by
// putting its folder first, and the kernels run unchanged on the host (tests/test_attention_cuda_host.py):
//   <attention_ptx.cuh>     the PTX wrappers: cp.async, ldmatrix, mma.sync m16n8k16;
//   <attention_launch.cuh>  the launch helper and the kernels' dynamic shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "attention_kernels.h"

namespace dera_fast::attn {
namespace {

constexpr int kThreads = 128;  // 4 warps in every kernel
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
constexpr float kNaN = __builtin_nanf("");  // a quiet NaN
constexpr int kPad = 8;  // 16-bit elements of padding per smem row: rows start 16 bytes apart mod 128, so the
                         // 8 row addresses of an ldmatrix hit 8 different bank groups
constexpr int kRowsPerCta = 16;  // combine and delta kernels: one warp per row, 4 rows per warp

template <Dtype DT> struct Elem;
template <> struct Elem<Dtype::kFloat32> { using T = float; };
template <> struct Elem<Dtype::kFloat16> { using T = __half; };
template <> struct Elem<Dtype::kBFloat16> { using T = __nv_bfloat16; };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half (the lower column index).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// Reduction over the 4 lanes of an mma quad (they share the rows g and g + 8 of a fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace
}  // namespace dera_fast::attn

#include <attention_ptx.cuh>  // through the include path: see the top of this file

namespace dera_fast::attn {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Warp-level tile GEMMs on padded row-major smem tiles (row stride LD elements). ldmatrix x4: lane L gives the
// address of row L % 8 of 8x8 matrix L / 8; register i receives matrix i.

// A operand, 16x16 block at (r0, c0): matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) = a0..a3.
template <int LD, typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* s, int r0, int c0) {
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  ldsm_x4(a, s + (r0 + (lane & 7) + (mat & 1) * 8) * LD + c0 + (mat >> 1) * 8);
}
template <int KT, int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[KT][4], const T* s, int r0) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) ldsm_a<LD>(a[kk], s, r0, kk * 16);
}

// acc[16 x 8NT] += A[16 x 16KT] * S^T where S is smem [8NT rows (n)][16KT cols (k)] (e.g. Q K^T with S = K).
// B[k][n] = S[n][k]: b0 of n-tile n0 is matrix (rows n0.., cols k0..), b1 is (n0.., k0+8..): no transpose.
template <typename T, int KT, int NT, int LD>
__device__ __forceinline__ void gemm_nt(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* s) {
  static_assert(NT % 2 == 0, "n tiles come in pairs");
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  const int r = (lane & 7) + (mat >> 1) * 8, c = (mat & 1) * 8;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4(b, s + (np * 16 + r) * LD + kk * 16 + c);
      mma16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc[16 x 8NT] += A[16 x 16KT] * S where S is smem [16KT rows (k)][8NT cols (n)] (e.g. P V with S = V).
// B[k][n] = S[k][n]: transposed ldmatrix; b0 of n-tile n0 is matrix (rows k0.., cols n0..), b1 (k0+8.., n0..).
template <typename T, int KT, int NT, int LD>
__device__ __forceinline__ void gemm_nn(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* s) {
  static_assert(NT % 2 == 0, "n tiles come in pairs");
  const int lane = threadIdx.x & 31, mat = lane >> 3;
  const int r = (lane & 7) + (mat & 1) * 8, c = (mat >> 1) * 8;
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4_trans(b, s + (kk * 16 + r) * LD + np * 16 + c);
      mma16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// fp32 accumulators of a 16 x 16KT tile -> A fragments (rounded to T): n-tiles 2kk and 2kk+1 form k-step kk.
template <typename T, int KT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[KT][4], const float (&c)[2 * KT][4]) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Rows [row0, row0 + ROWS) of the row-major [n_rows, D] matrix `base` -> smem (row stride D + kPad), async.
// Rows at or past n_rows are zero-filled.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile_async(T* s, const T* base, int row0, int n_rows) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = row0 + r < n_rows;
    cp_async16(s + r * (D + kPad) + col, ok ? base + static_cast<int64_t>(row0 + r) * D + col : base, ok);
  }
}

// Rows [row0, row0 + R) of the row-major [n_rows, D] fp32 matrix `src` -> the smem tile dst[R][LD] (the SIMT
// kernels; LD = D or D + 1). Rows at or past n_rows are zero-filled.
template <int R, int D, int LD>
__device__ __forceinline__ void load_rows_simt(float (*dst)[LD], const float* src, int row0, int n_rows) {
  for (int i = threadIdx.x; i < R * D; i += kThreads) {
    const int r = i / D, c = i % D;
    dst[r][c] = row0 + r < n_rows ? src[static_cast<int64_t>(row0 + r) * D + c] : 0.f;
  }
}

// Store the 16 x D accumulator rows of this warp (scaled by mul[0] for row g, mul[1] for row g + 8) as T.
template <typename T, int D>
__device__ __forceinline__ void store_acc(T* out, const float (&acc)[D / 8][4], int row_g, int n_rows,
                                          const float (&mul)[2]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row_g + 8 * r >= n_rows) continue;
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + static_cast<int64_t>(row_g + 8 * r) * D + 2 * t);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4] = pack2<T>(acc[dt][2 * r] * mul[r], acc[dt][2 * r + 1] * mul[r]);
  }
}

}  // namespace
}  // namespace dera_fast::attn

// Explicit instantiations of a launcher (attention_fwd_launch / attention_bwd_launch) for every dtype and head dim
// the extension ships (the cases csrc/attention_cuda.cpp dispatches on).
#define DERA_ATTN_INSTANTIATE_DT(LAUNCH, DT)                         \
  template cudaError_t LAUNCH<DT, 32>(const Params&, cudaStream_t);  \
  template cudaError_t LAUNCH<DT, 64>(const Params&, cudaStream_t);  \
  template cudaError_t LAUNCH<DT, 96>(const Params&, cudaStream_t);  \
  template cudaError_t LAUNCH<DT, 128>(const Params&, cudaStream_t);
#define DERA_ATTN_INSTANTIATE(LAUNCH)                 \
  DERA_ATTN_INSTANTIATE_DT(LAUNCH, Dtype::kFloat32)   \
  DERA_ATTN_INSTANTIATE_DT(LAUNCH, Dtype::kFloat16)   \
  DERA_ATTN_INSTANTIATE_DT(LAUNCH, Dtype::kBFloat16)

#include <attention_launch.cuh>  // through the include path: see the top of this file
