// CPU kernel of dera_fast_C::vq_nearest: ids[n] = argmin_k (bias[k] - 2 <z_n, c_k>), first index on ties.
//
// Blocked brute force, never an N x K buffer (extra memory O(K*D) for a packed codebook plus O(threads*block)):
//   * the codebook is packed once, transposed in blocks of kLanes codes: packed[kb][d][lane] = -2 * c[kb*16+lane][d]
//     (NOTE: scaling by -2 is exact in fp32, so bias + sum_d z_d * packed equals bias - 2 <z, c> up to the order
//     of the fp32 additions), with bias[k] per lane; padding codes get bias +inf so they are never selected.
//     The inner loop over one block of codes is then a single vector FMA per (row, d): it vectorises fully.
//   * kRows z rows are register-blocked: one load of a packed code vector feeds kRows FMAs.
//   * rows are processed in blocks of kRowBlock (converted to fp32 into a per-thread buffer, zero-padded past N);
//     codes in chunks sized to stay in L1 while all row micro-blocks of the row block reuse them.
//   * each lane keeps a running (value, index) minimum over the codes it sees (lane l sees codes l, l+16, ...
//     in increasing order, strict < keeps the first); the lanes are merged by (value, index), lowest index
//     among equal values, which gives exactly the first index of the row minimum.
// Batch invariance: every row goes through exactly the same arithmetic (same FMA chain, same code order), whatever
// its position in a block and whatever the other rows are; the partial last row block is zero-padded rather
// than handled by a different code path. Results are bitwise reproducible on a given machine (the ISA variant is
// chosen once at run time: AVX-512, AVX2+FMA, or baseline x86-64 without FMA).
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

constexpr int kLanes = 16;      // codes per packed block (one zmm, two ymm)
constexpr int kRowBlock = 64;   // rows converted and processed together by one thread
constexpr int kChunkBytes = 16 * 1024;  // packed codebook bytes per chunk (half of a 32 KiB L1d)

typedef float f32v __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i32v __attribute__((vector_size(kLanes * sizeof(int32_t))));

struct Packed {
  std::vector<float> codes;  // [KB][D][kLanes], -2 * codebook, zero-padded
  std::vector<float> bias;   // [KB][kLanes], +inf for padding codes
  int64_t blocks = 0;
};

Packed pack_codebook(const float* c, const float* bias, int64_t K, int64_t D) {
  Packed p;
  p.blocks = dera_fast::ceil_div(K, kLanes);
  p.codes.assign(static_cast<size_t>(p.blocks * D * kLanes), 0.0f);
  p.bias.assign(static_cast<size_t>(p.blocks * kLanes), std::numeric_limits<float>::infinity());
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t kb = b0; kb < b1; ++kb) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t k = kb * kLanes + l;
        if (k >= K) break;
        p.bias[kb * kLanes + l] = bias[k];
        for (int64_t d = 0; d < D; ++d) p.codes[(kb * D + d) * kLanes + l] = -2.0f * c[k * D + d];
      }
    }
  });
  return p;
}

// kRows rows of zb (fp32, row stride D) against code blocks [kb0, kb1); updates the per-lane running minima.
template <int kRows>
__attribute__((always_inline)) inline void micro_kernel(const float* __restrict zb, int64_t D,
                                                        const float* __restrict codes,
                                                        const float* __restrict bias, int64_t kb0, int64_t kb1,
                                                        f32v* __restrict best_v, i32v* __restrict best_i) {
  f32v bv[kRows];
  i32v bi[kRows];
  for (int r = 0; r < kRows; ++r) {
    bv[r] = best_v[r];
    bi[r] = best_i[r];
  }
  i32v lane_ids;
  for (int l = 0; l < kLanes; ++l) lane_ids[l] = l;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    f32v b;
    std::memcpy(&b, bias + kb * kLanes, sizeof(f32v));
    f32v acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = b;
    const float* cb = codes + kb * D * kLanes;
    for (int64_t d = 0; d < D; ++d) {
      f32v cv;
      std::memcpy(&cv, cb + d * kLanes, sizeof(f32v));
      for (int r = 0; r < kRows; ++r) acc[r] += zb[r * D + d] * cv;  // contracted to one FMA where available
    }
    const i32v ids = lane_ids + static_cast<int32_t>(kb * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const auto better = acc[r] < bv[r];  // strict: the earlier code of this lane wins ties (and NaN never wins)
      bv[r] = better ? acc[r] : bv[r];
      bi[r] = better ? ids : bi[r];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    best_v[r] = bv[r];
    best_i[r] = bi[r];
  }
}

// Rows [n0, n0 + kRowBlock) of z (already converted to fp32 in zb, zero-padded) -> ids.
template <int kRows>
__attribute__((always_inline)) inline void row_block(const float* __restrict zb, int64_t rows, int64_t D,
                                                     const Packed& p, int64_t* __restrict out) {
  static_assert(kRowBlock % kRows == 0, "row block must be a multiple of the register block");
  f32v best_v[kRowBlock];
  i32v best_i[kRowBlock];
  const f32v inf = f32v{} + std::numeric_limits<float>::infinity();
  for (int r = 0; r < kRowBlock; ++r) {
    best_v[r] = inf;
    best_i[r] = i32v{};
  }
  const int64_t rows_padded = dera_fast::ceil_div(rows, kRows) * kRows;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (std::max<int64_t>(D, 1) * kLanes * 4));
  for (int64_t kb0 = 0; kb0 < p.blocks; kb0 += chunk) {
    const int64_t kb1 = std::min(p.blocks, kb0 + chunk);
    for (int64_t r0 = 0; r0 < rows_padded; r0 += kRows)
      micro_kernel<kRows>(zb + r0 * D, D, p.codes.data(), p.bias.data(), kb0, kb1, best_v + r0, best_i + r0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float v = best_v[r][0];
    int32_t i = best_i[r][0];
    for (int l = 1; l < kLanes; ++l) {
      const float lv = best_v[r][l];
      const int32_t li = best_i[r][l];
      if (lv < v || (lv == v && li < i)) {
        v = lv;
        i = li;
      }
    }
    out[r] = i;
  }
}

template <typename T>
void load_rows(const T* z, int64_t n0, int64_t rows, int64_t D, float* zb) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) zb[r * D + d] = static_cast<float>(z[(n0 + r) * D + d]);
  std::fill(zb + rows * D, zb + kRowBlock * D, 0.0f);
}

// Row blocks [b0, b1) of z -> ids; zb is a per-thread fp32 buffer of kRowBlock * D floats.
template <int kRows, typename T>
__attribute__((always_inline)) inline void blocks_body(const T* z, int64_t N, int64_t D, const Packed& p,
                                                       int64_t* out, int64_t b0, int64_t b1, float* zb) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * kRowBlock;
    const int64_t rows = std::min<int64_t>(kRowBlock, N - n0);
    load_rows(z, n0, rows, D, zb);
    row_block<kRows>(zb, rows, D, p, out + n0);
  }
}

// NOTE: one function per ISA level (manual dispatch rather than target_clones) so that the register block can
// differ: AVX-512 has 32 vector registers (8 rows x 1 zmm accumulators), AVX2 16 (4 rows x 2 ymm). These are
// called from inside the parallel region: a lambda would not inherit a target attribute of its enclosing function.
#if defined(__x86_64__) && defined(__GNUC__)
#define DERA_VQ_X86_DISPATCH 1
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void blocks_avx512(const T* z, int64_t N, int64_t D, const Packed& p,
                                                             int64_t* out, int64_t b0, int64_t b1, float* zb) {
  blocks_body<8>(z, N, D, p, out, b0, b1, zb);
}
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void blocks_avx2(const T* z, int64_t N, int64_t D, const Packed& p,
                                                           int64_t* out, int64_t b0, int64_t b1, float* zb) {
  blocks_body<4>(z, N, D, p, out, b0, b1, zb);
}
#endif
template <typename T>
void blocks_generic(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out, int64_t b0, int64_t b1,
                    float* zb) {
  blocks_body<4>(z, N, D, p, out, b0, b1, zb);
}

template <typename T>
void search(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out) {
  auto* fn = &blocks_generic<T>;
#ifdef DERA_VQ_X86_DISPATCH
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    fn = &blocks_avx512<T>;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    fn = &blocks_avx2<T>;
#endif
  // OpenMP (ATen's parallel backend) over row blocks; grain 1 block.
  at::parallel_for(0, dera_fast::ceil_div(N, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> zb(static_cast<size_t>(kRowBlock * std::max<int64_t>(D, 1)));
    fn(z, N, D, p, out, b0, b1, zb.data());
  });
}

at::Tensor vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& bias) {
  DERA_CHECK_DIM(z, 2);
  DERA_CHECK_DIM(codebook, 2);
  DERA_CHECK_DIM(bias, 1);
  DERA_CHECK_FLOATING(z);
  DERA_CHECK_DTYPE(codebook, at::kFloat);
  DERA_CHECK_DTYPE(bias, at::kFloat);
  DERA_CHECK_CONTIGUOUS(z);
  DERA_CHECK_CONTIGUOUS(codebook);
  DERA_CHECK_CONTIGUOUS(bias);
  DERA_CHECK_SAME_DEVICE(z, codebook);
  DERA_CHECK_SAME_DEVICE(z, bias);
  TORCH_CHECK(z.device().is_cpu(), "z must be a CPU tensor, got ", z.device());
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  TORCH_CHECK(codebook.size(1) == D, "codebook must have D = ", D, " columns like z, got ", codebook.size(1));
  TORCH_CHECK(bias.size(0) == K, "bias must have K = ", K, " entries like codebook, got ", bias.size(0));
  TORCH_CHECK(K > 0, "codebook must have at least one code");
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max() - kLanes, "codebook too large: K = ", K);

  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;
  const Packed p = pack_codebook(codebook.data_ptr<float>(), bias.data_ptr<float>(), K, D);
  int64_t* o = out.data_ptr<int64_t>();
  switch (z.scalar_type()) {
    case at::kFloat:
      search(z.data_ptr<float>(), N, D, p, o);
      break;
    case at::kHalf:
      search(z.data_ptr<at::Half>(), N, D, p, o);
      break;
    default:
      search(z.data_ptr<at::BFloat16>(), N, D, p, o);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dera_fast_C, CPU, m) { m.impl("vq_nearest", &vq_nearest_cpu); }
