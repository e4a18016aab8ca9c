// CPU version of csrc/attention_launch.cuh (same names and signatures), found first on the include path by the
// emulated build: the grid's CTAs run one after another on host fibers, and every CTA's dynamic shared memory is
// one host buffer.
#pragma once
#include <cstring>

#include "attention_kernels.h"
#include "emu_runtime.h"

namespace dera_fast::attn {
namespace {

inline unsigned char* dynamic_smem() { return emu::dyn_smem; }

inline cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, size_t smem, const Params& p, cudaStream_t) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (grid.y > 65535 || grid.z > 65535 || smem > sizeof(emu::dyn_smem)) return cudaErrorInvalidConfiguration;
  struct Call { void (*kernel)(Params); const Params* p; } call{kernel, &p};
  const auto run = [](const void* c) { static_cast<const Call*>(c)->kernel(*static_cast<const Call*>(c)->p); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(emu::dyn_smem, 0xff, smem);  // NaN garbage: reads of smem nobody wrote show up
        emu::run_cta(run, &call, uint3{x, y, z});
      }
  return cudaSuccess;
}

}  // namespace
}  // namespace dera_fast::attn
