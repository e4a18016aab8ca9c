// SACP / two-task PCGrad multi-tensor kernels (torch-free interface; see dera_fast/ops/sacp.py for the maths).
//
// The gradients are described by two int64 tables in device memory, built on the host from shapes and addresses:
//   tensor table, one row per tensor: {a address, b address, out address, numel, group}; address 0 = None (zeros)
//   chunk table,  one row per chunk:  {tensor row, first element, partial slot}
// Slots are numbered group by group, so group g owns the slot range [seg[g], seg[g + 1]). One launch handles one
// dtype combination; all launches of a call share the slot numbering.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace dera_fast::sacp {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kTensorRow = 5;        // a, b, out, numel, group
constexpr int kChunkRow = 3;         // tensor row, start, slot
constexpr int64_t kChunk = 65536;    // elements per block (apex / PyTorch kChunkSize)

// partials[slot] = fp32 (sum a*b, sum a*a, sum b*b) over each chunk. partials: [num_slots, 3].
cudaError_t gram_partials_launch(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks, DType a_dtype,
                                 DType b_dtype, float* partials, cudaStream_t stream);
// gram[g] = sum of partials[seg[g] .. seg[g + 1]) in slot order (deterministic, no atomics). gram: [num_groups, 3].
cudaError_t gram_reduce_launch(const float* partials, const int64_t* seg, int64_t num_groups, float* gram,
                               cudaStream_t stream);
// out = w_a[group] * a + w_b[group] * b (+ out if accumulate) over each chunk; weights: fp32 [G, 2].
cudaError_t combine_launch(const int64_t* tensors, const int64_t* chunks, int64_t num_chunks, DType a_dtype,
                           DType b_dtype, DType out_dtype, const float* weights, bool accumulate,
                           cudaStream_t stream);

}  // namespace dera_fast::sacp
