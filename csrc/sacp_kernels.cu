// SACP multi-tensor kernels (torch-free). Design: apex multi_tensor_apply / multi_tensor_l2norm with the tensor
// metadata in device tables (sacp_kernels.h), one block per 64K-element chunk, per-chunk partial sums, then an
// ordered per-group reduction (no atomics, so results are bitwise reproducible for a given tensor list).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sacp_kernels.h"

namespace dera_fast::sacp {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;  // independent loads in flight per thread

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Sum v[0..2] over the block; thread 0 gets the result. Fixed shuffle tree, so the order is deterministic.
__device__ __forceinline__ void block_sum3(float v[3]) {
  __shared__ float smem[kThreads / 32][3];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < 3; ++k)
    for (int o = 16; o > 0; o /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  if (lane == 0)
    for (int k = 0; k < 3; ++k) smem[warp][k] = v[k];
  __syncthreads();
  if (warp == 0) {
    for (int k = 0; k < 3; ++k) {
      v[k] = lane < blockDim.x / 32 ? smem[lane][k] : 0.f;
      for (int o = 16; o > 0; o /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    }
  }
}

struct Chunk {
  const int64_t* row;  // tensor-table row
  int64_t start, n, slot;
};

__device__ __forceinline__ Chunk load_chunk(const int64_t* tensors, const int64_t* chunks) {
  const int64_t* c = chunks + static_cast<int64_t>(kChunkRow) * blockIdx.x;
  const int64_t* row = tensors + kTensorRow * c[0];
  const int64_t n = row[3] - c[1];
  return {row, c[1], n < kChunk ? n : kChunk, c[2]};
}

template <typename TA, typename TB>
__global__ void __launch_bounds__(kThreads) gram_partials_kernel(const int64_t* tensors, const int64_t* chunks,
                                                                 float* partials) {
  const Chunk c = load_chunk(tensors, chunks);
  const TA* a = reinterpret_cast<const TA*>(c.row[0]);
  const TB* b = reinterpret_cast<const TB*>(c.row[1]);
  a = a ? a + c.start : nullptr;  // None gradients (address 0) read as zeros, branch uniform over the block
  b = b ? b + c.start : nullptr;
  float v[3] = {0.f, 0.f, 0.f};
  for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kThreads) * kIlp) {
    float x[kIlp], y[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads;
      x[k] = (a && i < c.n) ? to_float(a[i]) : 0.f;
      y[k] = (b && i < c.n) ? to_float(b[i]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      v[0] = fmaf(x[k], y[k], v[0]);
      v[1] = fmaf(x[k], x[k], v[1]);
      v[2] = fmaf(y[k], y[k], v[2]);
    }
  }
  block_sum3(v);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) partials[3 * c.slot + k] = v[k];
}

__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(const float* partials, const int64_t* seg,
                                                               float* gram) {
  const int64_t lo = seg[blockIdx.x], hi = seg[blockIdx.x + 1];
  float v[3] = {0.f, 0.f, 0.f};
  for (int64_t s = lo + threadIdx.x; s < hi; s += kThreads)
    for (int k = 0; k < 3; ++k) v[k] += partials[3 * s + k];
  block_sum3(v);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) gram[3 * blockIdx.x + k] = v[k];
}

template <typename TA, typename TB, typename TO>
__global__ void __launch_bounds__(kThreads) combine_kernel(const int64_t* tensors, const int64_t* chunks,
                                                           const float* weights, bool accumulate) {
  const Chunk c = load_chunk(tensors, chunks);
  const TA* a = reinterpret_cast<const TA*>(c.row[0]);
  const TB* b = reinterpret_cast<const TB*>(c.row[1]);
  TO* out = reinterpret_cast<TO*>(c.row[2]) + c.start;
  a = a ? a + c.start : nullptr;
  b = b ? b + c.start : nullptr;
  const int64_t g = c.row[4];
  const float w_a = weights[2 * g], w_b = weights[2 * g + 1];
  for (int64_t base = threadIdx.x; base < c.n; base += static_cast<int64_t>(kThreads) * kIlp) {
    float y[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads;
      const bool in = i < c.n;
      y[k] = (a && in) ? w_a * to_float(a[i]) : 0.f;
      y[k] += (b && in) ? w_b * to_float(b[i]) : 0.f;
      y[k] += (accumulate && in) ? to_float(out[i]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * kThreads;
      if (i < c.n) out[i] = from_float<TO>(y[k]);
    }
  }
}

// Call f(T{}) with T the C++ type of dtype.
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
}

}  // namespace

cudaError_t gram_partials_launch(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks, DType a_dtype,
                                 DType b_dtype, float* partials, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  dispatch(a_dtype, [&](auto ta) {
    dispatch(b_dtype, [&](auto tb) {
      gram_partials_kernel<decltype(ta), decltype(tb)>
          <<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, chunks, partials);
    });
  });
  return cudaGetLastError();
}

cudaError_t gram_reduce_launch(const float* partials, const int64_t* seg, int64_t num_groups, float* gram,
                               cudaStream_t stream) {
  if (num_groups == 0) return cudaSuccess;
  gram_reduce_kernel<<<static_cast<unsigned>(num_groups), kThreads, 0, stream>>>(partials, seg, gram);
  return cudaGetLastError();
}

cudaError_t combine_launch(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks, DType a_dtype,
                           DType b_dtype, DType out_dtype, const float* weights, bool accumulate,
                           cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  dispatch(a_dtype, [&](auto ta) {
    dispatch(b_dtype, [&](auto tb) {
      dispatch(out_dtype, [&](auto to) {
        combine_kernel<decltype(ta), decltype(tb), decltype(to)>
            <<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, chunks, weights, accumulate);
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace dera_fast::sacp
