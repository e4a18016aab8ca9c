// Host emulation of the CUDA features the attention kernels use: a CTA is 128 fibers, __syncthreads a barrier
// over all of them, warp collectives (shuffles, ldmatrix, mma) go through a per-warp exchange buffer and barrier.
// Included first by the emulated programs; the CUDA headers give the types (__half, dim3, cudaError_t), the
// macros below turn the kernels' CUDA qualifiers into plain C++.
#pragma once
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
