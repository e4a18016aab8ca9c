// CPU version of csrc/attention_ptx.cuh (same names and signatures), found first on the include path by the
// emulated build. Fragment layouts from the PTX ISA
// (mma.m16n8k16 .f16/.bf16: g = lane / 4, t = lane % 4; A a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); B b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); C c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..)), written
// independently of the kernels. cp.async copies complete at once; ldmatrix and mma.sync exchange the fragments of
// the 32 lanes through the warp's buffer and barrier, as the hardware does through its shuffle network.
#pragma once
#include <cstdint>
#include <cstring>

#include "emu_runtime.h"

namespace dera_fast::attn {
namespace {

inline void cp_async16(void* dst, const void* src, bool pred) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (pred && reinterpret_cast<uintptr_t>(src) % 16))
    emu::die("misaligned cp.async");
  if (pred) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

inline void ldsm(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu::dyn_smem);
  if (a % 16 || a < base || a + 16 > base + sizeof(emu::dyn_smem)) emu::die("ldmatrix address");
  w.slot[l][0] = a;
  w.bar.wait();
  for (int i = 0; i < 4; ++i) {  // matrix i: rows given by lanes 8i .. 8i+7
    const auto row = [&](int rr) { return reinterpret_cast<const uint16_t*>(w.slot[8 * i + rr][0]); };
    const uint16_t lo = trans ? row(2 * (l % 4))[l / 4] : row(l / 4)[2 * (l % 4)];
    const uint16_t hi = trans ? row(2 * (l % 4) + 1)[l / 4] : row(l / 4)[2 * (l % 4) + 1];
    r[i] = lo | (static_cast<uint32_t>(hi) << 16);
  }
  w.bar.wait();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm(r, p, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { ldsm(r, p, true); }

template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) w.slot[l][i] = a[i];
  w.slot[l][4] = b0;
  w.slot[l][5] = b1;
  w.bar.wait();
  const auto val = [&](int ln, int reg, int k) {
    const uint16_t bits = static_cast<uint16_t>(w.slot[ln][reg] >> (16 * (k % 2)));
    T x;
    std::memcpy(&x, &bits, 2);
    return to_f(x);
  };
  const auto A = [&](int r, int k) { return val((r % 8) * 4 + (k % 8) / 2, (r >= 8) + 2 * (k >= 8), k); };
  const auto B = [&](int k, int n) { return val(n * 4 + (k % 8) / 2, 4 + (k >= 8), k); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float s = c[e];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[e] = s;
  }
  w.bar.wait();
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

}  // namespace
}  // namespace dera_fast::attn
