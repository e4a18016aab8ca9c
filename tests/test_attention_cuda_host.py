"""CPU checks of the attention CUDA backend (csrc/attention_kernels*.cu*, attention_kernels.h).

No GPU is needed: both tests build host programs with the C++ compiler and the CUDA headers (for the types).

test_attention_index_helpers checks the inline index arithmetic of attention_kernels.h exhaustively:
  * is_visible / visible_keys agree (the visible keys of a row are a prefix);
  * fwd_key_tiles: over all splits, every key tile holding a visible key of the query tile is visited exactly
    once and no other tile is, for ragged lengths, causal offsets of both signs and several tile sizes;
  * bwd_first_q_tile: the dK/dV kernels skip exactly the query tiles with no visible (query, key) pair;
  * seq_info / row_index in dense and varlen mode (rows of all sequences and heads map one-to-one onto [0, H*T));
  * choose_num_splits stays within [1, kMaxSplits] and one wave of SMs.

test_attention_kernels_emulated runs the real kernels and launchers (forward, split-KV combine, backward) on the
CPU: the CUDA sources are compiled by the host compiler with a small emulation layer. A CTA is 128 fibers;
__syncthreads, warp shuffles, ldmatrix (x4, .trans) and mma.sync.m16n8k16 are emulated from their PTX ISA
definitions (fragment layouts written independently of the kernels); the scheduler lets warps drift apart at
random so that a missing barrier shows up; unwritten shared memory reads as NaN. What it cannot check: the inline
PTX strings themselves, cp.async timing (copies complete at once), and anything about speed. The kernels are
compared with a float64 reference (out, lse, dq, dk, dv) on fp16, bf16 and fp32, every head dim, dense, varlen
(with an empty sequence), causal offsets of both signs (fully masked rows), and split-KV.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


def _build(src: Path, exe: Path, *includes: Path, warn: tuple = ("-Wall", "-Wextra", "-Werror")) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a host C++ compiler and the CUDA runtime headers (cuda_runtime.h)")
    cmd = [cxx, "-std=c++20", "-O1", *warn, *(f"-I{d}" for d in includes), f"-I{CSRC}", f"-I{inc}", str(src),
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def _run(exe: Path, timeout: int) -> None:
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.strip().endswith("0 failures"), res.stdout


HELPERS_PROGRAM = r"""
#include "attention_kernels.h"

#include <cstdio>
#include <vector>

using namespace dera_fast::attn;

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond) && failures++ < 20) {                            \
      std::printf("FAIL line %d (%s): ", __LINE__, #cond);       \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
    }                                                            \
  } while (0)

static Seq dense_seq(int lq, int lk, int off) {
  Params p;
  p.seqlen_q = lq;
  p.seqlen_k = lk;
  p.q_offset = off;
  return seq_info(p, 0);
}

static void check_tiles() {
  const int lens[] = {0, 1, 2, 7, 16, 17, 63, 64, 65, 113, 130};
  const int offs[] = {-70, -17, -1, 0, 1, 5, 64, 200};
  const int bms[] = {8, 16, 32, 64};
  const int bns[] = {8, 32, 64};
  const int splits[] = {1, 2, 3, 5, 16};
  for (int lq : lens) for (int lk : lens) for (int off : offs) for (int causal = 0; causal < 2; ++causal) {
    const Seq s = dense_seq(lq, lk, off);
    for (int row = 0; row < lq; ++row) {
      const int n = visible_keys(row, s, causal);
      for (int col = -1; col <= lk + 1; ++col)
        CHECK(is_visible(row, col, s, causal) == (col >= 0 && col < n), "lq=%d lk=%d off=%d row=%d col=%d", lq,
              lk, off, row, col);
    }
    for (int bm : bms) for (int bn : bns) {
      const int n_kt = static_cast<int>(cdiv(lk, bn)), n_qt = static_cast<int>(cdiv(lq, bm));
      auto any_visible = [&](int q0, int q1, int k0, int k1) {
        for (int i = q0; i < q1 && i < lq; ++i)
          for (int j = k0; j < k1 && j < lk; ++j)
            if (is_visible(i, j, s, causal)) return true;
        return false;
      };
      for (int m0 = 0; m0 < lq; m0 += bm) {
        for (int ns : splits) {
          std::vector<int> covered(n_kt + 1, 0);
          int prev_end = 0;
          for (int sp = 0; sp < ns; ++sp) {
            int b, e;
            fwd_key_tiles(m0, bm, bn, s, causal, sp, ns, &b, &e);
            CHECK(b <= e, "b=%d e=%d", b, e);
            if (b < e) {
              CHECK(b >= prev_end && e <= n_kt, "split %d/%d range [%d,%d) prev_end %d n_kt %d", sp, ns, b, e,
                    prev_end, n_kt);
              prev_end = e;
              for (int t = b; t < e && t <= n_kt; ++t) covered[t]++;
            }
          }
          for (int t = 0; t < n_kt; ++t) {
            const int needed = any_visible(m0, m0 + bm, t * bn, t * bn + bn);
            CHECK(covered[t] == needed, "lq=%d lk=%d off=%d causal=%d bm=%d bn=%d m0=%d ns=%d tile %d: %d vs %d",
                  lq, lk, off, causal, bm, bn, m0, ns, t, covered[t], needed);
          }
        }
      }
      for (int n0 = 0; n0 < lk; n0 += bn) {
        const int first = bwd_first_q_tile(n0, bm, s, causal);
        CHECK(first >= 0 && first <= n_qt, "first=%d n_qt=%d", first, n_qt);
        for (int it = 0; it < n_qt; ++it) {
          const bool has = any_visible(it * bm, it * bm + bm, n0, n0 + bn);
          CHECK(has == (it >= first), "lq=%d lk=%d off=%d causal=%d bm=%d bn=%d n0=%d it=%d first=%d", lq, lk,
                off, causal, bm, bn, n0, it, first);
        }
      }
    }
  }
}

static void check_rows() {
  // Dense [B, H, L, D]: flat row (b * H + h) * L + i.
  const int B = 3, H = 2, L = 5;
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < L; ++i)
    CHECK(row_index(int64_t(H) * L, L, b, h, 0, i) == (int64_t(b) * H + h) * L + i, "dense b=%d h=%d i=%d", b, h, i);
  // Varlen [1, H, T, D] with sequences of 3, 0, 7 and 2 queries and 4, 6, 0 and 9 keys.
  const int cu_q[] = {0, 3, 3, 10, 12}, cu_k[] = {0, 4, 10, 10, 19};
  const int S = 4, Tq = 12, Hv = 3;
  Params p;
  p.cu_seqlens_q = cu_q;
  p.cu_seqlens_k = cu_k;
  std::vector<int> hits(Hv * Tq, 0);
  for (int b = 0; b < S; ++b) {
    const Seq s = seq_info(p, b);
    CHECK(s.q_start == cu_q[b] && s.len_q == cu_q[b + 1] - cu_q[b], "varlen q seq %d", b);
    CHECK(s.k_start == cu_k[b] && s.len_k == cu_k[b + 1] - cu_k[b], "varlen k seq %d", b);
    CHECK(s.causal_offset == s.len_k - s.len_q, "varlen causal offset seq %d", b);
    for (int h = 0; h < Hv; ++h) for (int i = 0; i < s.len_q; ++i) {
      const int64_t r = row_index(0, Tq, b, h, s.q_start, i);
      CHECK(r >= 0 && r < Hv * Tq, "row %lld", static_cast<long long>(r));
      if (r >= 0 && r < Hv * Tq) hits[r]++;
    }
  }
  for (int r = 0; r < Hv * Tq; ++r) CHECK(hits[r] == 1, "varlen row %d hit %d times", r, hits[r]);
  const Seq d = dense_seq(9, 11, -3);
  CHECK(d.q_start == 0 && d.k_start == 0 && d.len_q == 9 && d.len_k == 11 && d.causal_offset == -3, "dense seq");
}

static void check_splits() {
  const int sms_list[] = {1, 108, 132};
  const int64_t kts[] = {0, 1, 2, 5, 40, 1000};
  for (int sms : sms_list) for (int64_t kt : kts) for (int64_t ctas = 1; ctas <= 300; ++ctas) {
    const int n = choose_num_splits(ctas, sms, kt);
    CHECK(n >= 1 && n <= kMaxSplits, "n=%d", n);
    if (ctas >= sms || kt <= 1) CHECK(n == 1, "ctas=%lld sms=%d kt=%lld n=%d", (long long)ctas, sms, (long long)kt, n);
    CHECK(n == 1 || (ctas * n <= sms && n <= kt), "ctas=%lld sms=%d kt=%lld n=%d", (long long)ctas, sms,
          (long long)kt, n);
  }
  CHECK(fwd_num_splits(Dtype::kBFloat16, 1, 1, 128, 4096, 132) > 1, "a small grid with a long Lk should split");
  CHECK(fwd_num_splits(Dtype::kBFloat16, 8, 12, 2048, 2048, 132) == 1, "a full grid should not split");
}

int main() {
  check_tiles();
  check_rows();
  check_splits();
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
"""



# ---- kernel emulation: the layer that replaces the PTX wrappers and launch_kernel ----
EMU_PRELUDE = r"""
// Host emulation of the CUDA features the attention kernels use: a CTA is 128 fibers, __syncthreads a barrier
// over all of them, warp collectives (shuffles, ldmatrix, mma) go through a per-warp exchange buffer and barrier.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
#include <type_traits>
#include <random>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(n) alignas(n)
#define __shared__ static  // static locals are shared by the CTA's threads; CTAs run one after another

namespace emu {
// The 128 threads of a CTA are ucontext fibers on one OS thread, switched at barriers (cooperative, so runs are
// deterministic and cheap).
struct Fiber {
  ucontext_t ctx;
  bool done;
};
inline ucontext_t sched_ctx;
inline Fiber fibers[128];
inline std::vector<char> stacks(size_t(128) << 18);  // 256 KiB per fiber
inline int cur = 0;
inline std::mt19937 rng(7);
inline unsigned long long progress = 0;
inline uint3 tid, bid;
alignas(16) inline unsigned char dyn_smem[192 * 1024];
[[noreturn]] inline void die(const char* what) {
  std::printf("EMULATION ERROR: %s\n", what);
  std::fflush(stdout);
  std::abort();
}
inline void yield() { swapcontext(&fibers[cur].ctx, &sched_ctx); }
struct Barrier {
  int n, count = 0;
  unsigned phase = 0;
  void wait() {
    ++progress;
    const unsigned ph = phase;
    if (++count == n) {
      count = 0;
      ++phase;
      return;
    }
    while (phase == ph) yield();
  }
};
struct Warp {
  Barrier bar{32};
  uint64_t slot[32][6];
};
inline Barrier cta_bar{128};
inline Warp warps[4];
inline int lane() { return static_cast<int>(tid.x & 31); }
inline Warp& warp() { return warps[tid.x >> 5]; }
template <typename F>
F shfl(F x, int src) {
  Warp& w = warp();
  std::memcpy(&w.slot[lane()][0], &x, sizeof(F));
  w.bar.wait();
  F r;
  std::memcpy(&r, &w.slot[src][0], sizeof(F));
  w.bar.wait();
  return r;
}
inline void (*entry_kernel)(const void*) = nullptr;
inline const void* entry_arg = nullptr;
inline void entry() {
  entry_kernel(entry_arg);
  fibers[cur].done = true;
  ++progress;
}
// Runs fn(arg) as one CTA of 128 threads with block index b.
inline void run_cta(void (*fn)(const void*), const void* arg, uint3 b) {
  entry_kernel = fn;
  entry_arg = arg;
  bid = b;
  for (int t = 0; t < 128; ++t) {
    fibers[t].done = false;
    getcontext(&fibers[t].ctx);
    fibers[t].ctx.uc_stack.ss_sp = stacks.data() + (size_t(t) << 18);
    fibers[t].ctx.uc_stack.ss_size = size_t(1) << 18;
    fibers[t].ctx.uc_link = &sched_ctx;
    makecontext(&fibers[t].ctx, entry, 0);
  }
  // Each round resumes the live fibers of a random subset of warps, in random order, so that warps drift apart
  // (a missing __syncthreads then lets one warp overwrite smem another still reads); a round resumes every warp
  // whenever the previous one made no progress, and a full round without progress is a deadlock.
  bool full = true;
  for (bool all_done = false; !all_done;) {
    all_done = true;
    const unsigned long long before = progress;
    int order[128];
    for (int t = 0; t < 128; ++t) order[t] = t;
    std::shuffle(order, order + 128, rng);
    const unsigned warp_mask = full ? 15u : static_cast<unsigned>(rng() % 16);
    for (int t : order) {
      if (fibers[t].done) continue;
      all_done = false;
      if (!(warp_mask >> (t / 32) & 1)) continue;
      cur = t;
      tid = uint3{static_cast<unsigned>(t), 0, 0};
      swapcontext(&sched_ctx, &fibers[t].ctx);
    }
    if (!all_done && full && progress == before) die("deadlock: threads wait at a barrier others never reach");
    full = progress == before;
  }
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
inline void __syncthreads() { emu::cta_bar.wait(); }
inline float __shfl_xor_sync(unsigned, float x, int o) { return emu::shfl(x, emu::lane() ^ o); }
inline float __shfl_sync(unsigned, float x, int src) { return emu::shfl(x, src); }
using std::min;
"""

EMU_PTX = r"""
// Replaces the PTX wrappers of attention_kernels_common.cuh. Fragment layouts from the PTX ISA
// (mma.m16n8k16 .f16/.bf16: g = lane / 4, t = lane % 4; A a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); B b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); C c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..)).
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
"""

EMU_LAUNCH = r"""
// Replaces launch_kernel: the grid's CTAs run one after another on host fibers.
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
"""

EMU_MAIN = r"""
#include "prelude.h"
#include "attention_kernels.cc"
#include "attention_kernels_bwd.cc"

#include <random>

using namespace dera_fast::attn;

static int failures = 0;

template <typename T> static float tf(T x) { return dera_fast::attn::to_f(x); }

template <Dtype DT, int D>
static void run_case(const char* name, int B, int H, const std::vector<int>& lqs, const std::vector<int>& lks,
                     bool varlen, bool causal, int q_offset, int splits, double tol) {
  using T = typename dera_fast::attn::Elem<DT>::T;
  const int S = varlen ? static_cast<int>(lqs.size()) : B, NB = varlen ? 1 : B;
  std::vector<int> cu_q(1, 0), cu_k(1, 0);
  for (int s = 0; s < (varlen ? S : 0); ++s) cu_q.push_back(cu_q.back() + lqs[s]), cu_k.push_back(cu_k.back() + lks[s]);
  const int Lq = varlen ? cu_q.back() : lqs[0], Lk = varlen ? cu_k.back() : lks[0];
  const size_t nq = size_t(NB) * H * Lq * D, nk = size_t(NB) * H * Lk * D, nr = size_t(NB) * H * Lq;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd;
  auto fill = [&](std::vector<T>& x, size_t n) { x.resize(n); for (auto& e : x) e = from_f<T>(nd(rng)); };
  std::vector<T> q, k, v, dout, out(nq), dq(nq), dk(nk), dv(nk);
  fill(q, nq); fill(k, nk); fill(v, nk); fill(dout, nq);
  std::vector<float> lse(nr), delta(nr), o_part(size_t(splits) * nq), lse_part(size_t(splits) * nr);
  Params p;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = out.data(); p.lse = lse.data();
  p.dout = dout.data(); p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data(); p.delta = delta.data();
  p.heads = H; p.scale = 1.f / std::sqrt(float(D)); p.causal = causal; p.q_offset = q_offset;
  if (varlen) {
    p.cu_seqlens_q = cu_q.data(); p.cu_seqlens_k = cu_k.data(); p.batch = S;
    p.seqlen_q = *std::max_element(lqs.begin(), lqs.end()); p.seqlen_k = *std::max_element(lks.begin(), lks.end());
    p.q_batch_rows = 0; p.k_batch_rows = 0;
  } else {
    p.batch = B; p.seqlen_q = Lq; p.seqlen_k = Lk; p.q_batch_rows = int64_t(H) * Lq; p.k_batch_rows = int64_t(H) * Lk;
  }
  p.q_head_rows = Lq; p.k_head_rows = Lk; p.total_q_rows = nr;
  p.num_splits = splits; p.o_partial = o_part.data(); p.lse_partial = lse_part.data();
  if (attention_fwd_launch<DT, D>(p, nullptr) != cudaSuccess || attention_bwd_launch<DT, D>(p, nullptr) != cudaSuccess) {
    std::printf("%s: launch failed\n", name); ++failures; return;
  }
  // Reference in double from the same (rounded) inputs.
  double e_out = 0, e_lse = 0, e_dq = 0, e_dk = 0, e_dv = 0, m_out = 0, m_dq = 0, m_dk = 0, m_dv = 0;
  int lse_inf_mismatch = 0;
  std::vector<double> gk(nk, 0.0), gv(nk, 0.0);
  for (int b = 0; b < S; ++b) for (int h = 0; h < H; ++h) {
    const int lq = varlen ? lqs[b] : Lq, lk = varlen ? lks[b] : Lk;
    const int64_t off = varlen ? lk - lq : q_offset;
    const size_t q0 = varlen ? size_t(h) * Lq + cu_q[b] : (size_t(b) * H + h) * Lq;
    const size_t k0 = varlen ? size_t(h) * Lk + cu_k[b] : (size_t(b) * H + h) * Lk;
    for (int i = 0; i < lq; ++i) {
      std::vector<double> sc(lk), pr(lk, 0.0);
      double mx = -INFINITY;
      for (int j = 0; j < lk; ++j) {
        double x = 0;
        for (int d = 0; d < D; ++d) x += double(tf(q[(q0 + i) * D + d])) * tf(k[(k0 + j) * D + d]);
        sc[j] = x * p.scale;
        if (!causal || j <= i + off) mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (int j = 0; j < lk; ++j) if (!causal || j <= i + off) sum += (pr[j] = std::exp(sc[j] - mx));
      const double ref_lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
      const float got_lse = lse[q0 + i];
      if (std::isinf(ref_lse) || std::isinf(got_lse)) lse_inf_mismatch += !(std::isinf(ref_lse) && got_lse == -INFINITY);
      else e_lse = std::max(e_lse, std::fabs(got_lse - ref_lse));
      std::vector<double> o(D, 0.0), dpv(lk, 0.0);
      for (int j = 0; j < lk; ++j) if (sum > 0) { pr[j] /= sum; for (int d = 0; d < D; ++d) o[d] += pr[j] * tf(v[(k0 + j) * D + d]); }
      double dl = 0;
      for (int d = 0; d < D; ++d) {
        dl += double(tf(dout[(q0 + i) * D + d])) * o[d];
        m_out = std::max(m_out, std::fabs(o[d]));
        e_out = std::max(e_out, std::fabs(tf(out[(q0 + i) * D + d]) - o[d]));
      }
      std::vector<double> gq(D, 0.0);
      for (int j = 0; j < lk; ++j) {
        if (pr[j] == 0) continue;
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += double(tf(dout[(q0 + i) * D + d])) * tf(v[(k0 + j) * D + d]);
        const double ds = pr[j] * (dp - dl);
        for (int d = 0; d < D; ++d) {
          gq[d] += p.scale * ds * tf(k[(k0 + j) * D + d]);
          gk[(k0 + j) * D + d] += p.scale * ds * tf(q[(q0 + i) * D + d]);
          gv[(k0 + j) * D + d] += pr[j] * tf(dout[(q0 + i) * D + d]);
        }
      }
      for (int d = 0; d < D; ++d) {
        m_dq = std::max(m_dq, std::fabs(gq[d]));
        e_dq = std::max(e_dq, std::fabs(tf(dq[(q0 + i) * D + d]) - gq[d]));
      }
    }
    for (int j = 0; j < lk; ++j) for (int d = 0; d < D; ++d) {
      const size_t ix = (k0 + j) * D + d;
      m_dk = std::max(m_dk, std::fabs(gk[ix])); m_dv = std::max(m_dv, std::fabs(gv[ix]));
      e_dk = std::max(e_dk, std::fabs(tf(dk[ix]) - gk[ix])); e_dv = std::max(e_dv, std::fabs(tf(dv[ix]) - gv[ix]));
    }
  }
  const bool ok = lse_inf_mismatch == 0 && e_lse <= tol && e_out <= tol * std::max(1.0, m_out) &&
                  e_dq <= tol * std::max(1.0, m_dq) && e_dk <= tol * std::max(1.0, m_dk) &&
                  e_dv <= tol * std::max(1.0, m_dv) && !std::isnan(e_out + e_dq + e_dk + e_dv + e_lse);
  std::printf("%-34s %s  err out %.2e lse %.2e dq %.2e dk %.2e dv %.2e (max |ref| %.1f %.1f %.1f %.1f)%s\n", name,
              ok ? "ok  " : "FAIL", e_out, e_lse, e_dq, e_dk, e_dv, m_out, m_dq, m_dk, m_dv,
              lse_inf_mismatch ? " lse -inf mismatch" : "");
  failures += !ok;
}

int main() {
  run_case<Dtype::kFloat16, 64>("fp16 d64 200x300", 1, 2, {200}, {300}, false, false, 0, 1, 2e-2);
  run_case<Dtype::kBFloat16, 32>("bf16 d32 causal 33x47 split3", 2, 1, {33}, {47}, false, true, 14, 3, 6e-2);
  run_case<Dtype::kFloat16, 96>("fp16 d96 causal off-5 20x150 split3", 1, 1, {20}, {150}, false, true, -5, 3, 2e-2);
  run_case<Dtype::kBFloat16, 128>("bf16 d128 varlen causal", 1, 1, {17, 0, 50}, {30, 5, 100}, true, true, 0, 1, 6e-2);
  run_case<Dtype::kFloat16, 32>("fp16 d32 causal 1x1", 1, 1, {1}, {1}, false, true, 0, 1, 2e-2);
  run_case<Dtype::kFloat32, 32>("fp32 d32 causal 40x37 split2", 1, 2, {40}, {37}, false, true, 0, 2, 2e-4);
  run_case<Dtype::kFloat32, 96>("fp32 d96 varlen", 1, 1, {9, 33}, {70, 5}, true, false, 0, 1, 2e-4);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def _emulated_sources(d: Path) -> None:
    """Copy the kernel sources into ``d`` with the PTX wrappers, launch_kernel and dynamic smem swapped out."""
    common = (CSRC / "attention_kernels_common.cuh").read_text()
    i = common.index("// PTX wrappers (sm_80+)")
    j = common.rindex("\n//", 0, common.index("// Warp-level tile GEMMs"))
    k = common.index("// Launch `kernel`")
    (d / "attention_kernels_common.cuh").write_text(common[:i] + EMU_PTX + common[j:k] + EMU_LAUNCH)
    for name in ("attention_kernels.cu", "attention_kernels_bwd.cu"):
        text = (CSRC / name).read_text()
        decl = "extern __shared__ __align__(16) unsigned char smem_raw[];"
        assert decl in text, f"{name}: dynamic shared memory declaration not found"
        (d / name.replace(".cu", ".cc")).write_text(text.replace(decl, "unsigned char* smem_raw = emu::dyn_smem;"))
    (d / "prelude.h").write_text(EMU_PRELUDE)
    (d / "main.cpp").write_text(EMU_MAIN)


def test_attention_index_helpers(tmp_path):
    (tmp_path / "helpers.cpp").write_text(HELPERS_PROGRAM)
    _run(_build(tmp_path / "helpers.cpp", tmp_path / "helpers"), timeout=120)


@pytest.mark.slow
def test_attention_kernels_emulated(tmp_path):
    _emulated_sources(tmp_path)
    exe = _build(tmp_path / "main.cpp", tmp_path / "emu", tmp_path, warn=("-Wno-unknown-pragmas",))
    _run(exe, timeout=600)
