// Torch-free CUDA launchers of the VQ op family (dera_fast_C::vq_nearest, vq_sample, codebook_ce_fwd/bwd).
//
// All pointers are device pointers to contiguous row-major arrays; every launcher enqueues on `stream`, returns
// the launch's cudaError_t and never synchronises. T is float, __half or __nv_bfloat16; all arithmetic is fp32.
// Shapes: N rows, K codes, D features (any N, K >= 1, 1 <= D <= 1024, checked by the torch glue).
// None of the kernels stores an N x K matrix, none uses atomics: results are bitwise deterministic and a row's
// result does not depend on the other rows of the batch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dera_fast::vq {

constexpr int64_t kMaxDim = 1024;

// ids[n] = argmin_k (bias[k] - 2 <z_n, c_k>), first index on ties. z: [N, D]; codebook: [K, D]; bias: [K].
template <typename T>
cudaError_t vq_nearest(const T* z, const float* codebook, const float* bias, int64_t* ids, int64_t N, int64_t K,
                       int64_t D, cudaStream_t stream);

// ids[n] = inverse-CDF sample at u[n] of softmax_k(<z_n, c_k> / max(|z_n|, 1e-12) * inv_temperature).
// codebook: [K, D] l2-normalised; u: [N] in [0, 1).
template <typename T>
cudaError_t vq_sample(const T* z, const float* codebook, const float* u, float inv_temperature, int64_t* ids,
                      int64_t N, int64_t K, int64_t D, cudaStream_t stream);

// loss[n] = lse[n] - l[n, target[n]], lse[n] = logsumexp_k l[n, k], l[n, k] = <h_n, c_k> * inv_temperature.
// h: [N, D]; codebook: [K, D]; target: [N] in [0, K) (out of range gives a NaN loss).
template <typename T>
cudaError_t codebook_ce_fwd(const T* h, const T* codebook, const int64_t* target, float inv_temperature,
                            float* loss, float* lse, int64_t N, int64_t K, int64_t D, cudaStream_t stream);

// With w[n, k] = (exp(l[n, k] - lse[n]) - [k == target[n]]) * grad_loss[n] * inv_temperature:
// grad_h[n] = sum_k w[n, k] c_k  ([N, D] fp32) and grad_codebook[k] = sum_n w[n, k] h_n  ([K, D] fp32).
template <typename T>
cudaError_t codebook_ce_bwd(const float* grad_loss, const T* h, const T* codebook, const int64_t* target,
                            const float* lse, float inv_temperature, float* grad_h, float* grad_codebook, int64_t N,
                            int64_t K, int64_t D, cudaStream_t stream);

}  // namespace dera_fast::vq
