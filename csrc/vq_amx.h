// AMX-BF16 screening pass of the CPU vq_nearest kernel (csrc/vq_amx_cpu.cpp), called by csrc/vq_cpu.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace dera_fast::vq_amx {

// True when this CPU has AMX-BF16 tiles and AVX-512 BF16 and the OS lets this process use the tile registers
// (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM)). Checked once.
bool available();

// ids[n] = argmin_k (bias[k] - 2 <z_n, c_k>), first index on ties, exactly as the fp32 tile of vq_cpu.cpp
// computes it: a bf16 AMX pass bounds every score and keeps the codes that can still be the fp32 minimum, and
// those (usually one) are re-scored with the fp32 kernel's own FMA chain.
// z: [N, D] (T = float, at::Half or at::BFloat16), c: [K, D] fp32, bias: [K] fp32, out: [N].
// Returns false, writing nothing, when the codebook or bias cannot be screened (a non-finite or huge value);
// rows it cannot screen (same reasons, or too many near-ties) are appended to `rest`, their out[] untouched.
template <typename T>
bool search(const T* z, int64_t N, int64_t D, const float* c, const float* bias, int64_t K, int64_t* out,
            std::vector<int64_t>* rest);

}  // namespace dera_fast::vq_amx
