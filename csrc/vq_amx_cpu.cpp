// AMX-BF16 screening pass of dera_fast_C::vq_nearest on CPUs with tile registers (Sapphire Rapids and later).
//
// Why: from D = 64 up, the fp32 tile of vq_cpu.cpp runs at ~95% of the core's fp32 FMA rate, so it cannot get much
// further ahead of the torch path (one GEMM and an argmin). AMX multiplies bf16 tiles at many times that rate, but a
// bf16 score alone would change answers, so it only screens:
//   * every code gets a score s'_k = bias_k + sum_d bf16(z_d) * bf16(-2 c_kd) (fp32 accumulation in the tiles) and a
//     rigorous bound |s'_k - s_k| <= T_k on its distance from the score s_k that the fp32 kernel computes (bias_k,
//     then one FMA per d), with T_k = a_n |c_k| + b_k (derivation at Bound);
//   * the fp32 minimiser k* has s'_k* - T_k* <= s_k* <= s_j <= s'_j + T_j for every j, so it is among the
//     candidates {k : s'_k - T_k <= U}, U = min_j (s'_j + T_j). A row keeps that list while the codes stream by;
//     U only falls, so entries above it are pruned when the list fills up;
//   * a single survivor is k* itself; several are re-scored with the fp32 kernel's own FMA chain and the lowest
//     (value, index) wins. So the answer is bitwise the fp32 kernel's: first-index ties and batch invariance hold.
// Rows with a non-finite or huge value, or more than kCap near-ties, go back to the fp32 kernel (`rest`).
// Floating-point modes: the bounds hold with or without flush-to-zero / denormals-are-zero, as long as every thread
// runs the same mode (torch.set_flush_denormal sets only the calling thread's; a mixed mode makes the answer for a
// row depend on which thread ran it, in the fp32 kernel too).
// Layout: the codebook is packed once per call as bf16 in AMX's pair-interleaved B layout,
// [K/16][D/32][16 dim pairs][16 codes][2]; z is converted per block of kBlock rows to row-major bf16, which the A
// tiles read directly. Per block, for each step of 32 codes (two B tiles, L1-resident) and each 32 rows (two A tiles
// from L2), four accumulator tiles run over D, are stored to a 32 x 32 buffer and folded into the candidates.
#include "vq_amx.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define DERA_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DERA_TARGET_SPR __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))
#endif

namespace dera_fast::vq_amx {

#ifdef DERA_AMX
namespace {

constexpr int64_t kBlock = 256;   // rows converted together per thread (bf16: kBlock * D * 2 bytes, L2)
constexpr int kCap = 32;          // candidate slots per row
constexpr int64_t kMaxD = 4096;   // wider codes take the fp32 kernel (the block buffer would leave L2)
constexpr double kMaxNorm = 0x1p40, kMaxBias = 0x1p90;  // keeps every product and sum far from overflow

struct alignas(64) TileConfig {  // palette 1: eight tiles of 16 rows x 64 bytes
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

float round_up(double x) {  // the smallest float >= x, for x >= 0 finite
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// The screening bound, T_k = alpha |z| |c_k| + beta |bias_k| + floor_k. With u = 2^-8 (bf16 rounding), e = 2^-24
// (fp32), g(n) = n e / (1 - n e), P = |z| |c_k| >= sum_d |z_d c_kd| (Cauchy-Schwarz):
//   rounding z and c to bf16 moves 2 <z, c_k> by at most 2 (2u + u^2) P;
//   the tile accumulation (at most 2D + 2 roundings in any order) and the fp32 add of bias_k move s'_k by at most
//   2 (1 + u)^2 (g(2D + 2) + e (1 + g)) P + e |bias_k|;
//   the fp32 kernel's chain (D + 1 roundings) is at most g(D + 1) (|bias_k| + 2P) from the exact score;
//   the fold computes T, s' - T and s' + T in fp32: one more e (|bias_k| + 2.1 P) and a factor 1 / (1 - e)^2;
//   AMX and the bf16 conversion flush denormals (inputs and outputs): at most 2^-116 (D + 4 + 2 sqrt(D)(|z| + |c|)),
//   the |z| part bounded with |z| <= kMaxNorm (rows above it are not screened).
// alpha carries a further 1% for the rounding of the norms themselves (computed in double).
struct Bound {
  double alpha, beta, floor0, floor_c;
  explicit Bound(int64_t D) {
    const double u = 0x1p-8, e = 0x1p-24, n1 = 2.0 * D + 2, n2 = D + 1.0;
    const double g1 = n1 * e / (1 - n1 * e), g2 = n2 * e / (1 - n2 * e), shrink = (1 - e) * (1 - e);
    alpha = 1.01 * (2 * (2 * u + u * u) + 2 * (1 + u) * (1 + u) * (g1 + e * (1 + g1)) + 2 * g2 + 2.1 * e) / shrink;
    beta = 1.01 * (2 * e + g2) / shrink;
    floor0 = 0x1p-116 * (D + 4 + 2 * std::sqrt(static_cast<double>(D)) * kMaxNorm);
    floor_c = 0x1p-116 * 2 * std::sqrt(static_cast<double>(D));
  }
};

// Small vector helpers. NOTE: GCC 12's _mm512_reduce_* and the plain (non-maskz) extract / convert forms trip
// -Wuninitialized in its own header; these avoid them.
DERA_TARGET_SPR double hsum(__m512d x) {
  alignas(64) double t[8];
  _mm512_store_pd(t, x);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}
// Lanes [8 * half, 8 * half + 8) of x in double (exact).
DERA_TARGET_SPR __m512d widen(__m512 x, int half) {
  return half ? _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, x, 1))
              : _mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, x, 0));
}
DERA_TARGET_SPR float hmin(__m512 x) {
  alignas(64) float t[16];
  _mm512_store_ps(t, x);
  return *std::min_element(t, t + 16);
}

// -2 * x[0:n] as bf16 (round to nearest even) into dst, zero up to n_pad; returns sum x^2 in double.
DERA_TARGET_SPR double to_bf16_row(const float* x, int64_t n, int64_t n_pad, float scale, uint16_t* dst) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  const __m512 k = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < n_pad; d += 16) {
    const int64_t left = n - d;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + d);
    const __m512d lo = widen(v, 0), hi = widen(v, 1);
    s0 = _mm512_fmadd_pd(lo, lo, s0);
    s1 = _mm512_fmadd_pd(hi, hi, s1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(v, k));  // NOTE: -2x is exact; the rounding is bf16's
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)h);
  }
  return hsum(_mm512_add_pd(s0, s1));
}

struct Codes {
  std::unique_ptr<uint16_t[]> tiles;  // [groups][chunks][16 pairs][16 codes][2] bf16 of -2 c
  std::vector<float> bias, norm, slack;  // per padded code: bias (+inf for padding), |c_k| rounded up, b_k
  int64_t groups = 0, chunks = 0;
};

// Packs the codebook; false when a code or bias is non-finite or beyond kMaxNorm / kMaxBias.
DERA_TARGET_SPR bool pack_codes(const float* c, const float* bias, int64_t K, int64_t D, const Bound& bd,
                                Codes* p) {
  const int64_t dp = ceil_div(D, 32) * 32;
  p->groups = ceil_div(K, 32) * 2;  // an even number of 16-code groups: the loop takes two B tiles per step
  p->chunks = dp / 32;
  p->tiles.reset(new uint16_t[static_cast<size_t>(p->groups * p->chunks * 512)]);
  const int64_t kp = p->groups * 16;
  p->bias.assign(kp, std::numeric_limits<float>::infinity());
  p->norm.assign(kp, 0.0f);
  p->slack.assign(kp, 0.0f);
  std::vector<uint8_t> bad(static_cast<size_t>(p->groups), 0);
  at::parallel_for(0, p->groups, 1, [&](int64_t g0, int64_t g1) {
    std::unique_ptr<uint16_t[]> rows(new uint16_t[static_cast<size_t>(16 * dp)]);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(rows.get(), rows.get() + 16 * dp, uint16_t(0));
      for (int64_t n = 0; n < 16 && g * 16 + n < K; ++n) {
        const int64_t k = g * 16 + n;
        const double norm = std::sqrt(to_bf16_row(c + k * D, D, dp, -2.0f, rows.get() + n * dp));
        if (!(norm <= kMaxNorm) || !(std::fabs(bias[k]) <= kMaxBias)) bad[g] = 1;
        p->bias[k] = bias[k];
        p->norm[k] = round_up(norm);
        p->slack[k] = round_up(bd.beta * std::fabs(bias[k]) + bd.floor0 + bd.floor_c * norm);
      }
      // VNNI pairs: B row j of chunk q holds, for each code n, the pair (d = 32q + 2j, 32q + 2j + 1)
      uint16_t* dst = p->tiles.get() + g * p->chunks * 512;
      for (int64_t q = 0; q < p->chunks; ++q)
        for (int j = 0; j < 16; ++j)
          for (int n = 0; n < 16; ++n) {
            const uint16_t* pair = rows.get() + n * dp + q * 32 + 2 * j;
            dst[((q * 16 + j) * 16 + n) * 2] = pair[0];
            dst[((q * 16 + j) * 16 + n) * 2 + 1] = pair[1];
          }
    }
  });
  return std::none_of(bad.begin(), bad.end(), [](uint8_t b) { return b != 0; });
}

// Tile state of the calling thread for the guard's lifetime (released on every exit, exceptions included).
struct Tiles {
  DERA_TARGET_SPR explicit Tiles(const TileConfig& cfg) { _tile_loadconfig(&cfg); }
  DERA_TARGET_SPR ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

struct Rows {  // candidate lists of one block of rows
  float U[kBlock];            // min over seen codes of s' + T (FLT_MAX before the first)
  float a[kBlock];            // alpha |z_n|, rounded up
  int count[kBlock];
  bool skip[kBlock];          // not screened: fp32 kernel
  int32_t k[kBlock][kCap];
  float lo[kBlock][kCap];
};

// A row's tile hit: lower U with this vector's s' + T, then keep every code with s' - T <= U.
DERA_TARGET_SPR void hit(Rows& st, int64_t r, __m512 sp, __m512 t, int32_t k0) {
  st.U[r] = std::min(st.U[r], hmin(_mm512_add_ps(sp, t)));
  if (st.skip[r]) return;
  const __m512 lo = _mm512_sub_ps(sp, t);
  alignas(64) float lov[16];
  _mm512_store_ps(lov, lo);
  uint32_t m = _mm512_cmp_ps_mask(lo, _mm512_set1_ps(st.U[r]), _CMP_LE_OQ);
  for (; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    if (st.count[r] == kCap) {  // full: drop what the lower U has ruled out
      int kept = 0;
      for (int i = 0; i < kCap; ++i)
        if (st.lo[r][i] <= st.U[r]) {
          st.k[r][kept] = st.k[r][i];
          st.lo[r][kept++] = st.lo[r][i];
        }
      st.count[r] = kept;
      if (kept == kCap) {
        st.skip[r] = true;
        return;
      }
    }
    st.k[r][st.count[r]] = k0 + l;
    st.lo[r][st.count[r]++] = lov[l];
  }
}

// A second, tighter screen for rows with several survivors: the score in double, v = bias - 2 sum_d z_d c_kd
// (fp32 products are exact in double), and e >= |v - s_k|: the fp32 chain is within g(D + 1) (|bias| + 2A) of the
// exact score, A = sum_d |z_d c_kd|, the double sums within (D + 2) 2^-52 of that; with flush-to-zero on (MXCSR FTZ,
// e.g. torch.set_flush_denormal) the chain also loses each denormal FMA result (< 2^-126 each: 2^-120 (D + 2)) and,
// without DAZ, each product whose -2 c_kd flushed (< 2^-126 |z_d| each: 2^-124 (|z|_1 + |c|_1)). With DAZ both sides
// drop the same denormal inputs (the conversion to double honours it). Usually one code is left; the rest are ties.
DERA_TARGET_SPR void near_score(const float* z, const float* c, float bias, int64_t D, double* v, double* e) {
  __m512d dot0 = _mm512_setzero_pd(), dot1 = _mm512_setzero_pd(), abs0 = dot0, abs1 = dot0, l1 = dot0;
  for (int64_t d = 0; d < D; d += 16) {
    const int64_t left = D - d;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 zv = _mm512_maskz_loadu_ps(m, z + d), cv = _mm512_maskz_loadu_ps(m, c + d);
    const __m512d z0 = widen(zv, 0), z1 = widen(zv, 1), c0 = widen(cv, 0), c1 = widen(cv, 1);
    dot0 = _mm512_fmadd_pd(z0, c0, dot0);
    dot1 = _mm512_fmadd_pd(z1, c1, dot1);
    abs0 = _mm512_fmadd_pd(_mm512_abs_pd(z0), _mm512_abs_pd(c0), abs0);
    abs1 = _mm512_fmadd_pd(_mm512_abs_pd(z1), _mm512_abs_pd(c1), abs1);
    l1 = _mm512_add_pd(l1, _mm512_add_pd(_mm512_add_pd(_mm512_abs_pd(z0), _mm512_abs_pd(z1)),
                                          _mm512_add_pd(_mm512_abs_pd(c0), _mm512_abs_pd(c1))));
  }
  const double dot = hsum(_mm512_add_pd(dot0, dot1));
  const double a = hsum(_mm512_add_pd(abs0, abs1));
  const double e32 = 0x1p-24, n = D + 1.0, g = n * e32 / (1 - n * e32);
  *v = static_cast<double>(bias) - 2 * dot;
  *e = 1.01 * ((g + (D + 2) * 0x1p-52) * (std::fabs(static_cast<double>(bias)) + 2 * a) + 0x1p-120 * (D + 2) +
               0x1p-124 * hsum(l1));
}

// The fp32 kernel's score of (z, code k): bias, then fma(z_d, -2 c_kd, .) for d = 0, 1, ..., D - 1, exactly its
// sequence of roundings (only true ties get here, after near_score).
DERA_TARGET_SPR float exact_score(const float* z, const float* c, float bias, int64_t D) {
  float acc = bias;
  for (int64_t d = 0; d < D; ++d) acc = std::fma(z[d], -2.0f * c[d], acc);
  return acc;
}

// Row `src` as fp32: the row itself, or its conversion in `buf` (D floats).
template <typename T>
const float* row_f32(const T* src, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(src[d]);
    return buf;
  }
}

// Rows [b0 * kBlock, b1 * kBlock): screen, then resolve each row.
template <typename T>
DERA_TARGET_SPR void run_blocks(const T* z, int64_t N, int64_t D, const float* c, const Codes& p, const Bound& bd,
                                int64_t* out, uint8_t* to_rest, int64_t b0, int64_t b1) {
  const int64_t dp = p.chunks * 32;
  auto st = std::make_unique<Rows>();
  std::vector<uint16_t> a(static_cast<size_t>(kBlock * dp));  // the A tiles (tileloadd needs no alignment)
  // fp32 copies of the rows to re-score (only when z is not fp32 already)
  std::vector<float> zf(std::is_same_v<T, float> ? 0 : static_cast<size_t>(kBlock * D));
  alignas(64) float cbuf[32 * 32];
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  const Tiles tiles(cfg);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n0 = blk * kBlock, rows = std::min(kBlock, N - n0), sub = ceil_div(rows, int64_t(32));
    for (int64_t r = 0; r < sub * 32; ++r) {
      uint16_t* dst = a.data() + r * dp;
      st->U[r] = std::numeric_limits<float>::max();
      st->count[r] = 0;
      if (r >= rows) {
        std::fill(dst, dst + dp, uint16_t(0));
        continue;
      }
      const float* zr = row_f32(z + (n0 + r) * D, D, zf.empty() ? nullptr : zf.data() + r * D);
      const double norm = std::sqrt(to_bf16_row(zr, D, dp, 1.0f, dst));
      st->skip[r] = !(norm <= kMaxNorm);
      if (st->skip[r]) std::fill(dst, dst + dp, uint16_t(0));
      st->a[r] = st->skip[r] ? 0.0f : round_up(bd.alpha * norm);
    }
    for (int64_t g = 0; g < p.groups; g += 2) {
      const uint16_t* bt0 = p.tiles.get() + g * p.chunks * 512;
      const uint16_t* bt1 = bt0 + p.chunks * 512;
      const __m512 bias0 = _mm512_loadu_ps(&p.bias[g * 16]), bias1 = _mm512_loadu_ps(&p.bias[g * 16 + 16]);
      const __m512 cn0 = _mm512_loadu_ps(&p.norm[g * 16]), cn1 = _mm512_loadu_ps(&p.norm[g * 16 + 16]);
      const __m512 sl0 = _mm512_loadu_ps(&p.slack[g * 16]), sl1 = _mm512_loadu_ps(&p.slack[g * 16 + 16]);
      for (int64_t s = 0; s < sub; ++s) {
        const uint16_t* a0 = a.data() + s * 32 * dp;
        const uint16_t* a1 = a0 + 16 * dp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t q = 0; q < p.chunks; ++q) {
          _tile_loadd(4, a0 + q * 32, dp * 2);
          _tile_loadd(5, a1 + q * 32, dp * 2);
          _tile_loadd(6, bt0 + q * 512, 64);
          _tile_loadd(7, bt1 + q * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, cbuf, 128);
        _tile_stored(1, cbuf + 16, 128);
        _tile_stored(2, cbuf + 512, 128);
        _tile_stored(3, cbuf + 528, 128);
        const int64_t rmax = std::min<int64_t>(32, rows - s * 32);
        for (int64_t i = 0; i < rmax; ++i) {
          const int64_t r = s * 32 + i;
          const __m512 ar = _mm512_set1_ps(st->a[r]), u = _mm512_set1_ps(st->U[r]);
          const __m512 sp0 = _mm512_add_ps(_mm512_load_ps(cbuf + i * 32), bias0);
          const __m512 sp1 = _mm512_add_ps(_mm512_load_ps(cbuf + i * 32 + 16), bias1);
          const __m512 t0 = _mm512_fmadd_ps(ar, cn0, sl0), t1 = _mm512_fmadd_ps(ar, cn1, sl1);
          const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_sub_ps(sp0, t0), u, _CMP_LE_OQ);
          const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_sub_ps(sp1, t1), u, _CMP_LE_OQ);
          if (__builtin_expect((m0 | m1) != 0, 0)) {
            const int32_t k0 = static_cast<int32_t>(g * 16);
            if (m0) hit(*st, r, sp0, t0, k0);
            if (m1) hit(*st, r, sp1, t1, k0 + 16);
          }
        }
      }
    }
    // resolve: a single survivor is the answer; several go through near_score, and what is still tied is
    // re-scored exactly (in increasing code order: strict < keeps the first index of the minimum)
    for (int64_t r = 0; r < rows; ++r) {
      if (st->skip[r]) {
        to_rest[n0 + r] = 1;
        continue;
      }
      int32_t* ks = st->k[r];
      int survivors = 0;
      for (int i = 0; i < st->count[r]; ++i)
        if (st->lo[r][i] <= st->U[r]) ks[survivors++] = ks[i];
      const float* zr = zf.empty() ? reinterpret_cast<const float*>(z + (n0 + r) * D) : zf.data() + r * D;  // fp32
      if (survivors > 1) {  // the tighter screen
        double v[kCap], e[kCap], u = std::numeric_limits<double>::infinity();
        for (int i = 0; i < survivors; ++i) {
          near_score(zr, c + ks[i] * D, p.bias[ks[i]], D, &v[i], &e[i]);
          u = std::min(u, v[i] + e[i]);
        }
        int left = 0;
        for (int i = 0; i < survivors; ++i)
          if (v[i] - e[i] <= u) ks[left++] = ks[i];
        survivors = left;
      }
      int32_t best = ks[0];
      float best_v = survivors > 1 ? exact_score(zr, c + best * D, p.bias[best], D) : 0.0f;
      for (int i = 1; i < survivors; ++i) {
        const float v = exact_score(zr, c + ks[i] * D, p.bias[ks[i]], D);
        if (v < best_v) {
          best_v = v;
          best = ks[i];
        }
      }
      out[n0 + r] = best;
    }
  }
}

}  // namespace

bool available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;  // tile, bf16
    unsigned a1, b1, c1, d1;
    if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !(a1 & (1u << 5))) return false;  // AVX512_BF16
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
      return false;
    // Linux keeps the tile state off until a process asks for it (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18);
    // the grant is process-wide and refused where the kernel or hypervisor does not enable AMX.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

template <typename T>
bool search(const T* z, int64_t N, int64_t D, const float* c, const float* bias, int64_t K, int64_t* out,
            std::vector<int64_t>* rest) {
  if (!available() || D > kMaxD || N <= 0) return false;
  const Bound bd(D);
  Codes p;
  if (!pack_codes(c, bias, K, D, bd, &p)) return false;
  std::vector<uint8_t> to_rest(static_cast<size_t>(N), 0);
  at::parallel_for(0, ceil_div(N, kBlock), 1, [&](int64_t b0, int64_t b1) {
    run_blocks<T>(z, N, D, c, p, bd, out, to_rest.data(), b0, b1);
  });
  for (int64_t n = 0; n < N; ++n)
    if (to_rest[n]) rest->push_back(n);
  return true;
}

#else  // no AMX on this platform

bool available() { return false; }

template <typename T>
bool search(const T*, int64_t, int64_t, const float*, const float*, int64_t, int64_t*, std::vector<int64_t>*) {
  return false;
}

#endif

template bool search<float>(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t*,
                            std::vector<int64_t>*);
template bool search<c10::Half>(const c10::Half*, int64_t, int64_t, const float*, const float*, int64_t, int64_t*,
                                std::vector<int64_t>*);
template bool search<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, const float*, const float*, int64_t,
                                    int64_t*, std::vector<int64_t>*);

}  // namespace dera_fast::vq_amx
