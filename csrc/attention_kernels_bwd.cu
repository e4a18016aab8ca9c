// Fused attention backward kernels (FlashAttention-2 style, deterministic), torch-free. See attention_kernels.cu
// for the forward and the list of simplifications against FA2, attention_kernels.h for the interface.
//
// Three launches: delta = rowsum(dO * O); dK/dV with one CTA per key tile looping over query tiles (P and dS
// recomputed from lse); dQ with one CTA per query tile looping over key tiles. Every output element is written by
// exactly one thread: no atomics, bit-identical results run to run.
// Per (query i, key j): P = exp(s_ij * scale - lse_i), dV_j += P dO_i, dP = dO_i . V_j, dS = P (dP - delta_i),
// dK_j += scale dS Q_i, dQ_i += scale dS K_j.
#include "attention_kernels_common.cuh"

namespace dera_fast::attn {
namespace {

// 16-bit tiles. dK/dV: 4 warps x 16 keys, query tiles of kvBM rows streamed; dQ: 4 warps x 16 queries, key
// tiles of qBN streamed. The streamed tile shrinks for D > 64 so that the per-warp fragments stay in registers.
constexpr int kMmaKvBN = 64;
constexpr int kMmaQBM = 64;
constexpr int mma_kv_bm(int d) { return d <= 64 ? 64 : 32; }
constexpr int mma_q_bn(int d) { return d <= 64 ? 64 : 32; }
// fp32 SIMT tiles (sized so static shared memory stays under 48 KiB at D = 128).
constexpr int kSimtKvBN = 8;   // keys per dK/dV CTA, 2 per warp; query tiles of 32 (one query per lane)
constexpr int kSimtKvBM = 32;
constexpr int kSimtQBM = 8;    // queries per dQ CTA, 2 per warp; key tiles of 32 (one key per lane)
constexpr int kSimtQBN = 32;

// Backward preprocess: delta = rowsum(dout * o) in fp32. Same grid as the combine kernel.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Params p) {
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Seq s = seq_info(p, b);
  const int row_end = min(static_cast<int>(blockIdx.x + 1) * kRowsPerCta, s.len_q);
  for (int row = static_cast<int>(blockIdx.x) * kRowsPerCta + warp; row < row_end; row += kWarps) {
    const int64_t ri = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, row);
    const T* dout = static_cast<const T*>(p.dout) + ri * D;
    const T* o = static_cast<const T*>(p.o) + ri * D;
    float x = 0.f;
    for (int d = lane; d < D; d += 32) x += to_f(dout[d]) * to_f(o[d]);
    x = warp_sum(x);
    if (lane == 0) p.delta[ri] = x;
  }
}

// lse in log2 units for the backward's P = exp2(S * scale * log2e - lse2). Rows past the sequence and rows
// without any visible key (lse = -inf) get +inf, so their P is exactly 0.
__device__ __forceinline__ float bwd_lse2(const Params& p, int64_t ri, bool valid) {
  const float l = valid ? p.lse[ri] : -kInf;
  return l == -kInf ? kInf : l * kLog2e;
}



// ---------------------------------------------------------------------------------------------------------
// dK/dV, 16-bit. Grid (cdiv(seqlen_k, 64), heads, batch). Each warp computes S^T = K Q^T and dP^T = V dO^T for
// its 16 keys, so P^T and dS^T come out as accumulators that feed dV += P^T dO and dK += dS^T Q directly.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_mma_kernel(const Params p) {
  constexpr int BN = kMmaKvBN, BM = mma_kv_bm(D), LD = D + kPad, KT = D / 16;
  static_assert(BN == 16 * kWarps, "one warp per 16 keys");
  unsigned char* smem_raw = dynamic_smem();
  T* sK = reinterpret_cast<T*>(smem_raw);                     // [BN][LD]
  T* sV = sK + BN * LD;                                       // [BN][LD]
  T* sQ = sV + BN * LD;                                       // [2][BM][LD]
  T* sdO = sQ + 2 * BM * LD;                                  // [2][BM][LD]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // [2][BM], log2 units
  float* sDelta = sLse + 2 * BM;                              // [2][BM]

  const int b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int n0 = blockIdx.x * BN;
  if (n0 >= s.len_k) return;
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const T* q = static_cast<const T*>(p.q) + q_row0 * D;
  const T* dout = static_cast<const T*>(p.dout) + q_row0 * D;
  const int it_begin = bwd_first_q_tile(n0, BM, s, p.causal);
  const int it_end = static_cast<int>(cdiv(s.len_q, BM));
  auto load_q_tile = [&](int it, int buf) {
    load_tile_async<T, BM, D>(sQ + buf * BM * LD, q, it * BM, s.len_q);
    load_tile_async<T, BM, D>(sdO + buf * BM * LD, dout, it * BM, s.len_q);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const int row = it * BM + i;
      const bool ok = row < s.len_q;
      sLse[buf * BM + i] = bwd_lse2(p, q_row0 + row, ok);
      sDelta[buf * BM + i] = ok ? p.delta[q_row0 + row] : 0.f;
    }
  };
  load_tile_async<T, BN, D>(sK, static_cast<const T*>(p.k) + k_row0 * D, n0, s.len_k);
  load_tile_async<T, BN, D>(sV, static_cast<const T*>(p.v) + k_row0 * D, n0, s.len_k);
  if (it_begin < it_end) load_q_tile(it_begin, 0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int key_g = n0 + warp * 16 + g;  // this lane's keys: key_g and key_g + 8
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const float scale_log2 = p.scale * kLog2e;

  for (int it = it_begin; it < it_end; ++it) {
    const int buf = (it - it_begin) & 1;
    if (it + 1 < it_end) load_q_tile(it + 1, buf ^ 1);  // other buffer, last read in iteration it - 1
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* q_s = sQ + buf * BM * LD;
    const T* do_s = sdO + buf * BM * LD;
    const float* lse_s = sLse + buf * BM;
    const float* delta_s = sDelta + buf * BM;

    float st[BM / 8][4], dpt[BM / 8][4];
    zero(st);
    zero(dpt);
    {
      uint32_t kf[KT][4];
      load_a<KT, LD>(kf, sK, warp * 16);
      gemm_nt<T, KT, BM / 8, LD>(st, kf, q_s);  // S^T = K Q^T: rows = this warp's keys, columns = queries
    }
    {
      uint32_t vf[KT][4];
      load_a<KT, LD>(vf, sV, warp * 16);
      gemm_nt<T, KT, BM / 8, LD>(dpt, vf, do_s);  // dP^T = V dO^T
    }
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * t + (e & 1);  // query (column) within the tile
        const bool vis = is_visible(it * BM + ql, key_g + (e >> 1) * 8, s, p.causal);
        const float pv = vis ? exp2f(st[nt][e] * scale_log2 - lse_s[ql]) : 0.f;
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - delta_s[ql]);  // dS^T
      }
    }
    uint32_t fa[BM / 16][4];
    acc_to_a<T, BM / 16>(fa, st);
    gemm_nn<T, BM / 16, D / 8, LD>(dv, fa, do_s);  // dV += P^T dO
    acc_to_a<T, BM / 16>(fa, dpt);
    gemm_nn<T, BM / 16, D / 8, LD>(dk, fa, q_s);  // dK += dS^T Q
    __syncthreads();  // everyone is done with buffer `buf` before iteration it + 1 refills it
  }
  cp_async_wait<0>();  // no copy may still be in flight when the CTA exits

  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_acc<T, D>(static_cast<T*>(p.dk) + k_row0 * D, dk, key_g, s.len_k, scale);
  store_acc<T, D>(static_cast<T*>(p.dv) + k_row0 * D, dv, key_g, s.len_k, one);
}

// dQ, 16-bit. Grid (cdiv(seqlen_q, 64), heads, batch). Same structure as the forward: Q and dO fragments stay
// in registers, K/V tiles are double-buffered.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_mma_kernel(const Params p) {
  constexpr int BM = kMmaQBM, BN = mma_q_bn(D), LD = D + kPad, KT = D / 16;
  static_assert(BM == 16 * kWarps, "one warp per 16 query rows");
  unsigned char* smem_raw = dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sdO = sQ + BM * LD;                   // [BM][LD]
  T* sK = sdO + BM * LD;                   // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int m0 = blockIdx.x * BM;
  if (m0 >= s.len_q) return;
  int t_begin, t_end;
  fwd_key_tiles(m0, BM, BN, s, p.causal, 0, 1, &t_begin, &t_end);
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const T* k = static_cast<const T*>(p.k) + k_row0 * D;
  const T* v = static_cast<const T*>(p.v) + k_row0 * D;

  load_tile_async<T, BM, D>(sQ, static_cast<const T*>(p.q) + q_row0 * D, m0, s.len_q);
  load_tile_async<T, BM, D>(sdO, static_cast<const T*>(p.dout) + q_row0 * D, m0, s.len_q);
  if (t_begin < t_end) {
    load_tile_async<T, BN, D>(sK, k, t_begin * BN, s.len_k);
    load_tile_async<T, BN, D>(sV, v, t_begin * BN, s.len_k);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_g = m0 + warp * 16 + g;  // this lane's rows: row_g and row_g + 8
  uint32_t qf[KT][4], dof[KT][4];
  load_a<KT, LD>(qf, sQ, warp * 16);
  load_a<KT, LD>(dof, sdO, warp * 16);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = row_g + 8 * r < s.len_q;
    lse2[r] = bwd_lse2(p, q_row0 + row_g + 8 * r, ok);
    delta[r] = ok ? p.delta[q_row0 + row_g + 8 * r] : 0.f;
  }
  float dq[D / 8][4];
  zero(dq);
  const float scale_log2 = p.scale * kLog2e;

  for (int j = t_begin; j < t_end; ++j) {
    const int buf = (j - t_begin) & 1;
    if (j + 1 < t_end) {
      load_tile_async<T, BN, D>(sK + (buf ^ 1) * BN * LD, k, (j + 1) * BN, s.len_k);
      load_tile_async<T, BN, D>(sV + (buf ^ 1) * BN * LD, v, (j + 1) * BN, s.len_k);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_s = sK + buf * BN * LD;
    float sc[BN / 8][4], dp[BN / 8][4];
    zero(sc);
    zero(dp);
    gemm_nt<T, KT, BN / 8, LD>(sc, qf, k_s);                // S = Q K^T
    gemm_nt<T, KT, BN / 8, LD>(dp, dof, sV + buf * BN * LD);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const bool vis = is_visible(row_g + 8 * r, j * BN + nt * 8 + 2 * t + (e & 1), s, p.causal);
        const float pv = vis ? exp2f(sc[nt][e] * scale_log2 - lse2[r]) : 0.f;
        dp[nt][e] = pv * (dp[nt][e] - delta[r]);  // dS
      }
    }
    uint32_t da[BN / 16][4];
    acc_to_a<T, BN / 16>(da, dp);
    gemm_nn<T, BN / 16, D / 8, LD>(dq, da, k_s);  // dQ += dS K
    __syncthreads();
  }

  const float scale[2] = {p.scale, p.scale};
  store_acc<T, D>(static_cast<T*>(p.dq) + q_row0 * D, dq, row_g, s.len_q, scale);
}

// ---------------------------------------------------------------------------------------------------------
// dK/dV, fp32 SIMT. Grid (cdiv(seqlen_k, 8), heads, batch). Warp w owns keys 2w, 2w+1 of the CTA's tile; for
// P and dS lane = query of the 32-query tile, for dK/dV lane = head-dim column.
template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_simt_kernel(const Params p) {
  constexpr int BN = kSimtKvBN, BM = kSimtKvBM, KPW = BN / kWarps, DPL = D / 32;
  static_assert(BM == 32, "one query per lane");
  __shared__ float sK[BN][D], sV[BN][D];
  __shared__ float sQ[BM][D + 1], sdO[BM][D + 1];  // odd row stride: lane-per-row reads are conflict free
  __shared__ float sLse[BM], sDelta[BM];

  const int b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int n0 = blockIdx.x * BN;
  if (n0 >= s.len_k) return;
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const float* q = static_cast<const float*>(p.q) + q_row0 * D;
  const float* dout = static_cast<const float*>(p.dout) + q_row0 * D;
  const float* k = static_cast<const float*>(p.k) + k_row0 * D;
  const float* v = static_cast<const float*>(p.v) + k_row0 * D;
  load_rows_simt<BN, D>(sK, k, n0, s.len_k);
  load_rows_simt<BN, D>(sV, v, n0, s.len_k);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float dk[KPW][DPL] = {}, dv[KPW][DPL] = {};
  const float scale_log2 = p.scale * kLog2e;
  const int it_end = static_cast<int>(cdiv(s.len_q, BM));

  for (int it = bwd_first_q_tile(n0, BM, s, p.causal); it < it_end; ++it) {
    __syncthreads();  // previous query tile fully consumed
    load_rows_simt<BM, D>(sQ, q, it * BM, s.len_q);
    load_rows_simt<BM, D>(sdO, dout, it * BM, s.len_q);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const bool ok = it * BM + i < s.len_q;
      sLse[i] = bwd_lse2(p, q_row0 + it * BM + i, ok);
      sDelta[i] = ok ? p.delta[q_row0 + it * BM + i] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KPW; ++kk) {
      const int kl = warp * KPW + kk;
      float x = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        x += sQ[lane][d] * sK[kl][d];
        dp += sdO[lane][d] * sV[kl][d];
      }
      const bool vis = is_visible(it * BM + lane, n0 + kl, s, p.causal);
      const float pv = vis ? exp2f(x * scale_log2 - sLse[lane]) : 0.f;
      const float ds = pv * (dp - sDelta[lane]);
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        float a = dv[kk][c], bk = dk[kk][c];
        for (int ii = 0; ii < BM; ++ii) {
          a += __shfl_sync(0xffffffffu, pv, ii) * sdO[ii][lane + 32 * c];
          bk += __shfl_sync(0xffffffffu, ds, ii) * sQ[ii][lane + 32 * c];
        }
        dv[kk][c] = a;
        dk[kk][c] = bk;
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int key = n0 + warp * KPW + kk;
    if (key >= s.len_k) continue;
    float* dk_out = static_cast<float*>(p.dk) + (k_row0 + key) * D;
    float* dv_out = static_cast<float*>(p.dv) + (k_row0 + key) * D;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      dk_out[lane + 32 * c] = dk[kk][c] * p.scale;
      dv_out[lane + 32 * c] = dv[kk][c];
    }
  }
}

// dQ, fp32 SIMT. Grid (cdiv(seqlen_q, 8), heads, batch). Warp w owns query rows 2w, 2w+1; for P and dS
// lane = key of the 32-key tile, for dQ lane = head-dim column.
template <int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_simt_kernel(const Params p) {
  constexpr int BM = kSimtQBM, BN = kSimtQBN, RPW = BM / kWarps, DPL = D / 32;
  static_assert(BN == 32, "one key per lane");
  __shared__ float sQ[BM][D], sdO[BM][D];
  __shared__ float sK[BN][D + 1], sV[BN][D + 1];

  const int b = blockIdx.z, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int m0 = blockIdx.x * BM;
  if (m0 >= s.len_q) return;
  int t_begin, t_end;
  fwd_key_tiles(m0, BM, BN, s, p.causal, 0, 1, &t_begin, &t_end);
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const float* q = static_cast<const float*>(p.q) + q_row0 * D;
  const float* dout = static_cast<const float*>(p.dout) + q_row0 * D;
  const float* k = static_cast<const float*>(p.k) + k_row0 * D;
  const float* v = static_cast<const float*>(p.v) + k_row0 * D;
  load_rows_simt<BM, D>(sQ, q, m0, s.len_q);
  load_rows_simt<BM, D>(sdO, dout, m0, s.len_q);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float lse2[RPW], delta[RPW], dq[RPW][DPL] = {};
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = m0 + warp * RPW + rr;
    lse2[rr] = bwd_lse2(p, q_row0 + row, row < s.len_q);
    delta[rr] = row < s.len_q ? p.delta[q_row0 + row] : 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  for (int j = t_begin; j < t_end; ++j) {
    __syncthreads();  // previous tile fully consumed (and sQ/sdO written, on the first pass)
    load_rows_simt<BN, D>(sK, k, j * BN, s.len_k);
    load_rows_simt<BN, D>(sV, v, j * BN, s.len_k);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int rl = warp * RPW + rr;
      float x = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        x += sQ[rl][d] * sK[lane][d];
        dp += sdO[rl][d] * sV[lane][d];
      }
      const bool vis = is_visible(m0 + rl, j * BN + lane, s, p.causal);
      const float pv = vis ? exp2f(x * scale_log2 - lse2[rr]) : 0.f;
      const float ds = pv * (dp - delta[rr]);
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        float a = dq[rr][c];
        for (int jj = 0; jj < BN; ++jj) a += __shfl_sync(0xffffffffu, ds, jj) * sK[jj][lane + 32 * c];
        dq[rr][c] = a;
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = m0 + warp * RPW + rr;
    if (row >= s.len_q) continue;
    float* dq_out = static_cast<float*>(p.dq) + (q_row0 + row) * D;
#pragma unroll
    for (int c = 0; c < DPL; ++c) dq_out[lane + 32 * c] = dq[rr][c] * p.scale;
  }
}

}  // namespace

template <Dtype DT, int D>
cudaError_t attention_bwd_launch(const Params& p, cudaStream_t stream) {
  using T = typename Elem<DT>::T;
  const auto blocks = [](int n, int tile) { return static_cast<unsigned>(cdiv(n, tile)); };
  cudaError_t err = launch_kernel(delta_kernel<T, D>, dim3(blocks(p.seqlen_q, kRowsPerCta), p.heads, p.batch), 0,
                                  p, stream);
  if (err != cudaSuccess) return err;
  if constexpr (DT == Dtype::kFloat32) {
    err = launch_kernel(bwd_dkdv_simt_kernel<D>, dim3(blocks(p.seqlen_k, kSimtKvBN), p.heads, p.batch), 0, p,
                        stream);
    if (err != cudaSuccess) return err;
    return launch_kernel(bwd_dq_simt_kernel<D>, dim3(blocks(p.seqlen_q, kSimtQBM), p.heads, p.batch), 0, p,
                         stream);
  } else {
    constexpr int LD = D + kPad, kv_bm = mma_kv_bm(D), q_bn = mma_q_bn(D);
    const size_t smem_kv = (2 * kMmaKvBN + 4 * kv_bm) * LD * sizeof(T) + 4 * kv_bm * sizeof(float);
    err = launch_kernel(bwd_dkdv_mma_kernel<T, D>, dim3(blocks(p.seqlen_k, kMmaKvBN), p.heads, p.batch), smem_kv,
                        p, stream);
    if (err != cudaSuccess) return err;
    const size_t smem_q = (2 * kMmaQBM + 4 * q_bn) * LD * sizeof(T);
    return launch_kernel(bwd_dq_mma_kernel<T, D>, dim3(blocks(p.seqlen_q, kMmaQBM), p.heads, p.batch), smem_q, p,
                         stream);
  }
}

DERA_ATTN_INSTANTIATE(attention_bwd_launch)

}  // namespace dera_fast::attn
