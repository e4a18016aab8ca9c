// Kernel launch and dynamic shared memory for the attention kernels. Included by attention_kernels_common.cuh
// through the include path; tests/cuda_emu/attention_launch.cuh is the CPU version the host emulation test swaps
// in (it runs a grid's CTAs one after another on host fibers).
#pragma once
#include <cuda_runtime.h>

#include "attention_kernels.h"

namespace dera_fast::attn {
namespace {

// The kernel's dynamic shared memory (sized at launch), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
}

// Launch `kernel` on `grid` x kThreads with `smem` bytes of dynamic shared memory; empty grids launch nothing.
inline cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, size_t smem, const Params& p,
                                 cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {  // above 48 KiB, dynamic shared memory needs an explicit opt-in (sm_80+: up to 227 KiB)
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace dera_fast::attn
