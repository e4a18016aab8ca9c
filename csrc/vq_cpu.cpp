// CPU kernel of dera_fast_C::vq_nearest: ids[n] = argmin_k (bias[k] - 2 <z_n, c_k>), first index on ties.
//
// A register-blocked distance tile with a fused running argmin (the structure of a BLIS micro-kernel); no N x K
// buffer exists, extra memory is O(K*D) for the packed codebook plus O(threads * kRowPanels * MR * D):
//   * the codebook is packed once per call into panels of NR = V * L codes, transposed so that one vector load
//     reads one dimension of L consecutive codes: packed[panel][d][lane] = -2 * c[panel * NR + lane][d], with
//     bias[k] per lane (NOTE: scaling by -2 is exact in fp32, so bias + sum_d z_d * packed is bias - 2 <z, c> up to
//     the order of the fp32 additions); padding codes get bias +inf so they are never selected;
//   * a tile is MR rows x NR codes held in MR * V vector accumulators over the whole of D: per dimension, V
//     vector loads of codes and MR broadcasts of z feed MR * V FMAs (AVX-512: 12 x 32 = 24 zmm accumulators);
//   * each finished tile is folded into the rows' running minima: per row, a lane-wise minimum (value, index)
//     and the row's overall minimum. The tile is compared against the row minimum first; only when some code
//     beats it (rare after the first panels: about 1/t of the tiles at panel t) are the lanes updated. Strict <
//     keeps the earlier code on ties (a lane sees its codes in increasing order) and NaN never wins; the lanes are
//     merged by (value, index) at the end, which gives exactly the first index of the row minimum;
//   * loops: per thread, a block of kRowPanels * MR rows is converted to fp32 and packed as [panel][d][MR]; the
//     codebook is streamed in chunks of ~kChunkBytes (L2) and, inside a chunk, one row panel (MR * D floats, L1)
//     meets every code panel of the chunk. NOTE: the other order (one code panel in L1, the row panels streamed
//     from L2) measured 35% slower: the broadcast loads want their rows in L1.
// Measured (bench/results/cpu-2core/vq_nearest.md, Xeon with AVX-512, one thread, shared machine): 77-140 GFLOP/s
// at D = 8 (the fold dominates), 135-178 at D = 32..64, 166-186 at D >= 128, i.e. 89-100% of a 2048^3 fp32 matmul
// on the same core (187 GFLOP/s); the tile alone, L1-resident, peaks at ~82% of a 12-chain FMA loop (~240).
// Batch invariance: every (row, code) score is the same FMA chain (bias, then d = 0, 1, ..., D - 1) wherever the
// row sits in a tile and whatever the other rows are; partial row panels are zero-padded, not handled by another
// code path. Results are bitwise reproducible on a given machine (the ISA variant is chosen once at run time:
// AVX-512, AVX2 + FMA, or a portable scalar version; DERA_FAST_CPU_ISA caps it).
// On CPUs with AMX-BF16 (and D >= kAmxMinD, N >= kAmxMinN) a bf16 screening pass (vq_amx_cpu.cpp) runs first and
// leaves this tile only the rows it cannot settle; its answers are bitwise this tile's (tests/test_vq.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "vq_amx.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// The traits below pass vector values between internal functions that are all inlined into one entry point per
// ISA; GCC's note that such a signature would change the ABI of an out-of-line call does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#define DERA_VQ_X86 1
#define DERA_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define DERA_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#endif

namespace {

constexpr int kRowPanels = 8;                 // row panels per thread block (z converted and packed together)
constexpr int64_t kChunkBytes = 512 * 1024;   // packed codebook bytes streamed per pass over a row panel (L2)
#define DERA_INLINE __attribute__((always_inline)) inline

// ---- vector traits: L lanes, tile MR x (V * L); masks as the ISA has them. NOTE: not always_inline: GCC inlines
// them once tile() has been inlined into the entry point carrying the matching target attribute. ----
#ifdef DERA_VQ_X86
struct Avx512 {
  static constexpr int L = 16, MR = 12, V = 2;  // 24 accumulators + 2 code vectors + 1 broadcast of 32 zmm
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  DERA_TARGET_AVX512 static F load(const float* p) { return _mm512_loadu_ps(p); }
  DERA_TARGET_AVX512 static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  DERA_TARGET_AVX512 static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  DERA_TARGET_AVX512 static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  DERA_TARGET_AVX512 static F bcast(float x) { return _mm512_set1_ps(x); }
  DERA_TARGET_AVX512 static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  DERA_TARGET_AVX512 static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  DERA_TARGET_AVX512 static M lor(M a, M b) { return a | b; }
  DERA_TARGET_AVX512 static bool any(M m) { return m != 0; }
  DERA_TARGET_AVX512 static F select(M m, F a, F b) { return _mm512_mask_mov_ps(b, m, a); }
  DERA_TARGET_AVX512 static I selecti(M m, I a, I b) { return _mm512_mask_mov_epi32(b, m, a); }
  DERA_TARGET_AVX512 static I iota(int32_t first) {
    return _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(first));
  }
};

struct Avx2 {
  static constexpr int L = 8, MR = 4, V = 2;  // 8 accumulators + 2 code vectors + 1 broadcast of 16 ymm
  using F = __m256;
  using I = __m256i;
  using M = __m256;
  DERA_TARGET_AVX2 static F load(const float* p) { return _mm256_loadu_ps(p); }
  DERA_TARGET_AVX2 static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  DERA_TARGET_AVX2 static I loadi(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  DERA_TARGET_AVX2 static void storei(int32_t* p, I v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  DERA_TARGET_AVX2 static F bcast(float x) { return _mm256_set1_ps(x); }
  DERA_TARGET_AVX2 static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  DERA_TARGET_AVX2 static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  DERA_TARGET_AVX2 static M lor(M a, M b) { return _mm256_or_ps(a, b); }
  DERA_TARGET_AVX2 static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  DERA_TARGET_AVX2 static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  DERA_TARGET_AVX2 static I selecti(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  DERA_TARGET_AVX2 static I iota(int32_t first) {
    return _mm256_add_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(first));
  }
};
#endif

// Portable version (one lane): the same tile and fold, plain C++. NOTE: without an FMA instruction the compiler
// rounds the product and the sum separately, so this variant's ties may differ from the vector ones.
struct Scalar {
  static constexpr int L = 1, MR = 4, V = 4;
  using F = float;
  using I = int32_t;
  using M = bool;
  static DERA_INLINE F load(const float* p) { return *p; }
  static DERA_INLINE void store(float* p, F v) { *p = v; }
  static DERA_INLINE I loadi(const int32_t* p) { return *p; }
  static DERA_INLINE void storei(int32_t* p, I v) { *p = v; }
  static DERA_INLINE F bcast(float x) { return x; }
  static DERA_INLINE F fma(F a, F b, F c) { return a * b + c; }
  static DERA_INLINE M lt(F a, F b) { return a < b; }
  static DERA_INLINE M lor(M a, M b) { return a || b; }
  static DERA_INLINE bool any(M m) { return m; }
  static DERA_INLINE F select(M m, F a, F b) { return m ? a : b; }
  static DERA_INLINE I selecti(M m, I a, I b) { return m ? a : b; }
  static DERA_INLINE I iota(int32_t first) { return first; }
};

struct Packed {
  std::unique_ptr<float[]> codes;  // [panels][D][NR], -2 * codebook, zero-padded (allocated uninitialised)
  std::vector<float> bias;         // [panels][NR], +inf for padding codes
  int64_t panels = 0;
  int64_t nr = 0;
};

Packed pack_codebook(const float* c, const float* bias, int64_t K, int64_t D, int64_t nr) {
  Packed p;
  p.nr = nr;
  p.panels = dera_fast::ceil_div(K, nr);
  p.codes.reset(new float[static_cast<size_t>(p.panels * D * nr)]);  // every element is written below
  p.bias.assign(static_cast<size_t>(p.panels * nr), std::numeric_limits<float>::infinity());
  at::parallel_for(0, p.panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t codes = std::min(nr, K - pi * nr);
      const float* src = c + pi * nr * D;  // the panel's codes, row-major [codes][D]
      float* dst = p.codes.get() + pi * D * nr;
      for (int64_t l = 0; l < codes; ++l) p.bias[pi * nr + l] = bias[pi * nr + l];
      // transpose with contiguous writes: the panel's source rows (nr * D floats) stay in L1 across the d loop
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t l = 0; l < codes; ++l) dst[d * nr + l] = -2.0f * src[l * D + d];
        for (int64_t l = codes; l < nr; ++l) dst[d * nr + l] = 0.0f;  // padding codes (bias +inf)
      }
    }
  });
  return p;
}

// Running minima of one row block: per row, L lanes of (value, index) and the row minimum.
struct Best {
  std::vector<float> value;     // [rows][L]
  std::vector<int32_t> index;   // [rows][L]
  std::vector<float> row_min;   // [rows]
};

// One MR x NR tile (code panel `c`, first code id0) over all of D, folded into the rows' running minima.
template <class S>
DERA_INLINE void tile(const float* __restrict zp, int64_t D, const float* __restrict c, const float* __restrict b,
                      int32_t id0, float* __restrict best_v, int32_t* __restrict best_i,
                      float* __restrict row_min) {
  constexpr int MR = S::MR, V = S::V, L = S::L, NR = V * L;
  typename S::F acc[MR][V];
  {  // d = 0 starts every FMA chain from the bias
    typename S::F bias[V], cv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      bias[v] = S::load(b + v * L);
      cv[v] = S::load(c + v * L);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const auto zr = S::bcast(zp[r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = S::fma(zr, cv[v], bias[v]);
    }
  }
#pragma GCC unroll 2
  for (int64_t d = 1; d < D; ++d) {
    typename S::F cv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) cv[v] = S::load(c + d * NR + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const auto zr = S::bcast(zp[d * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = S::fma(zr, cv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const auto rmin = S::bcast(row_min[r]);
    auto hit = S::lt(acc[r][0], rmin);
#pragma GCC unroll 4
    for (int v = 1; v < V; ++v) hit = S::lor(hit, S::lt(acc[r][v], rmin));
    if (__builtin_expect(S::any(hit), 0)) {
      auto bv = S::load(best_v + r * L);
      auto bi = S::loadi(best_i + r * L);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {  // vector v holds codes id0 + v * L + lane: increasing within each lane
        const auto better = S::lt(acc[r][v], bv);
        bv = S::select(better, acc[r][v], bv);
        bi = S::selecti(better, S::iota(id0 + v * L), bi);
      }
      S::store(best_v + r * L, bv);
      S::storei(best_i + r * L, bi);
      float m = best_v[r * L];
      for (int l = 1; l < L; ++l) m = std::min(m, best_v[r * L + l]);
      row_min[r] = m;
    }
  }
}

// Rows [b0 * RB, b1 * RB) of z -> ids, RB = kRowPanels * MR.
template <class S, typename T>
DERA_INLINE void row_blocks(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out, int64_t b0,
                            int64_t b1) {
  constexpr int MR = S::MR, L = S::L;
  constexpr int64_t RB = kRowPanels * MR;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (std::max<int64_t>(D, 1) * p.nr * 4));
  std::vector<float> zp(static_cast<size_t>(RB * D));  // [kRowPanels][D][MR]
  Best best{std::vector<float>(RB * L), std::vector<int32_t>(RB * L), std::vector<float>(RB)};
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n0 = blk * RB, rows = std::min<int64_t>(RB, N - n0);
    const int64_t panels = dera_fast::ceil_div(rows, MR);
    for (int64_t r = 0; r < panels * MR; ++r)
      for (int64_t d = 0; d < D; ++d)
        zp[((r / MR) * D + d) * MR + r % MR] = r < rows ? static_cast<float>(z[(n0 + r) * D + d]) : 0.0f;
    std::fill(best.value.begin(), best.value.end(), std::numeric_limits<float>::infinity());
    std::fill(best.index.begin(), best.index.end(), 0);
    std::fill(best.row_min.begin(), best.row_min.end(), std::numeric_limits<float>::infinity());
    for (int64_t c0 = 0; c0 < p.panels; c0 += chunk) {
      const int64_t c1 = std::min(p.panels, c0 + chunk);
      for (int64_t rp = 0; rp < panels; ++rp)
        for (int64_t pc = c0; pc < c1; ++pc)
          tile<S>(zp.data() + rp * D * MR, D, p.codes.get() + pc * D * p.nr, p.bias.data() + pc * p.nr,
                  static_cast<int32_t>(pc * p.nr), best.value.data() + rp * MR * L,
                  best.index.data() + rp * MR * L, best.row_min.data() + rp * MR);
    }
    for (int64_t r = 0; r < rows; ++r) {  // merge the lanes: lowest value, then lowest index
      float v = best.value[r * L];
      int32_t i = best.index[r * L];
      for (int l = 1; l < L; ++l) {
        const float lv = best.value[r * L + l];
        const int32_t li = best.index[r * L + l];
        if (lv < v || (lv == v && li < i)) {
          v = lv;
          i = li;
        }
      }
      out[n0 + r] = i;
    }
  }
}

// NOTE: one entry point per ISA level (manual dispatch rather than target_clones) so that the tile shape can
// differ; they are called from inside the parallel region (a lambda would not inherit a target attribute).
#ifdef DERA_VQ_X86
template <typename T>
DERA_TARGET_AVX512 void blocks_avx512(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out, int64_t b0,
                                      int64_t b1) {
  row_blocks<Avx512>(z, N, D, p, out, b0, b1);
}
template <typename T>
DERA_TARGET_AVX2 void blocks_avx2(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out, int64_t b0,
                                  int64_t b1) {
  row_blocks<Avx2>(z, N, D, p, out, b0, b1);
}
#endif
template <typename T>
void blocks_scalar(const T* z, int64_t N, int64_t D, const Packed& p, int64_t* out, int64_t b0, int64_t b1) {
  row_blocks<Scalar>(z, N, D, p, out, b0, b1);
}

enum class Isa { kAmx, kAvx512, kAvx2, kScalar };

// The best variant this CPU runs, capped by DERA_FAST_CPU_ISA=amx|avx512|avx2|scalar (tests run every variant).
// kAmx = the AVX-512 tile plus the AMX-BF16 screening pass of vq_amx_cpu.cpp (same answers, bitwise).
Isa detect_isa() {
  const char* cap = std::getenv("DERA_FAST_CPU_ISA");
  const std::string limit = cap ? cap : "amx";
#ifdef DERA_VQ_X86
  if ((limit == "amx" || limit == "avx512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return limit == "amx" && dera_fast::vq_amx::available() ? Isa::kAmx : Isa::kAvx512;
  if (limit != "scalar" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// The fp32 tile over all rows.
template <typename T>
void search_fp32(const T* z, int64_t N, int64_t D, const float* c, const float* bias, int64_t K, int64_t* out) {
  const Isa isa = cpu_isa();
  auto* fn = &blocks_scalar<T>;
  int64_t mr = Scalar::MR, nr = Scalar::V * Scalar::L;
#ifdef DERA_VQ_X86
  if (isa == Isa::kAvx512 || isa == Isa::kAmx) {
    fn = &blocks_avx512<T>;
    mr = Avx512::MR;
    nr = Avx512::V * Avx512::L;
  } else if (isa == Isa::kAvx2) {
    fn = &blocks_avx2<T>;
    mr = Avx2::MR;
    nr = Avx2::V * Avx2::L;
  }
#endif
  const Packed p = pack_codebook(c, bias, K, D, nr);
  // OpenMP (ATen's parallel backend) over row blocks; grain 1 block.
  at::parallel_for(0, dera_fast::ceil_div(N, kRowPanels * mr), 1,
                   [&](int64_t b0, int64_t b1) { fn(z, N, D, p, out, b0, b1); });
}

// Where the AMX screening pass pays for its codebook packing and per-tile fold (bench/bench_vq.py cpu_grid,
// bench/results/cpu-2core/vq_nearest.md): enough dimensions per score and enough rows per call.
constexpr int64_t kAmxMinD = 32, kAmxMinN = 16;

template <typename T>
void search(const T* z, int64_t N, int64_t D, const float* c, const float* bias, int64_t K, int64_t* out) {
  std::vector<int64_t> rest;
  if (cpu_isa() != Isa::kAmx || D < kAmxMinD || N < kAmxMinN ||
      !dera_fast::vq_amx::search(z, N, D, c, bias, K, out, &rest)) {
    search_fp32(z, N, D, c, bias, K, out);
    return;
  }
  if (rest.empty()) return;
  // rows the screen left (non-finite or huge values, many near-ties): the fp32 tile on a gathered copy; every
  // row's answer is independent of the others (batch invariance), so gathering changes nothing
  const int64_t R = static_cast<int64_t>(rest.size());
  std::vector<float> zr(static_cast<size_t>(R * D));
  std::vector<int64_t> ids(static_cast<size_t>(R));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t d = 0; d < D; ++d) zr[i * D + d] = static_cast<float>(z[rest[i] * D + d]);
  search_fp32(zr.data(), R, D, c, bias, K, ids.data());
  for (int64_t i = 0; i < R; ++i) out[rest[i]] = ids[i];
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
  TORCH_CHECK(D > 0, "z must have at least one column");
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max() - 64, "codebook too large: K = ", K);

  at::Tensor out = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return out;
  const float* c = codebook.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  switch (z.scalar_type()) {
    case at::kFloat:
      search(z.data_ptr<float>(), N, D, c, b, K, o);
      break;
    case at::kHalf:
      search(z.data_ptr<at::Half>(), N, D, c, b, K, o);
      break;
    default:
      search(z.data_ptr<at::BFloat16>(), N, D, c, b, K, o);
      break;
  }
  return out;
}

}  // namespace

namespace dera_fast {
// Declared in ops.cpp (the schema vq_nearest_cpu_isa).
std::string vq_nearest_cpu_isa() {
  switch (cpu_isa()) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}
}  // namespace dera_fast

TORCH_LIBRARY_IMPL(dera_fast_C, CPU, m) { m.impl("vq_nearest", &vq_nearest_cpu); }
