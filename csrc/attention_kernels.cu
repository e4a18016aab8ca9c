// Fused attention forward kernels (FlashAttention-2 style), torch-free. Interface and index helpers:
// attention_kernels.h; shared device helpers: attention_kernels_common.cuh; backward: attention_kernels_bwd.cu.
//
// 16-bit inputs (fp16/bf16), sm_80+: mma.sync.m16n8k16 with fp32 accumulators, fragments loaded by ldmatrix
// from padded shared-memory tiles, K/V (forward, dQ) or Q/dO (dK/dV) tiles streamed with cp.async double
// buffering. Each of the 4 warps of a CTA owns 16 rows of the tile it keeps resident.
// fp32 inputs: plain SIMT kernels (one key or one query per lane, warp shuffles); correctness first: no tensor
// cores, no cp.async, not tuned.
//
// Simplifications against FA2, chosen so the code can be checked by inspection:
//  * outputs are stored straight from the accumulator fragments (4-byte stores per lane), not staged in smem;
//  * K/V fragments in the dK/dV kernel are re-read from shared memory for every query tile (less register
//    pressure, more ldmatrix traffic);
//  * the backward uses two kernels (dK/dV over key tiles, dQ over query tiles) and recomputes S and dP in both,
//    instead of FA2's atomic dQ accumulation: deterministic, 7 tile matmuls per (query, key) tile pair instead
//    of FA2's 5 (1.4x the backward tensor-core work).
#include "attention_kernels_common.cuh"

namespace dera_fast::attn {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Forward, 16-bit. Grid (cdiv(seqlen_q, BM), heads, batch * num_splits).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_mma_kernel(const Params p) {
  constexpr int BM = kMmaFwdBM, BN = kMmaFwdBN, LD = D + kPad, KT = D / 16;
  static_assert(BM == 16 * kWarps, "one warp per 16 query rows");
  unsigned char* smem_raw = dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                    // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int split = blockIdx.z % p.num_splits, b = blockIdx.z / p.num_splits, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int m0 = blockIdx.x * BM;
  if (m0 >= s.len_q) return;
  int t_begin, t_end;
  fwd_key_tiles(m0, BM, BN, s, p.causal, split, p.num_splits, &t_begin, &t_end);
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const T* q = static_cast<const T*>(p.q) + q_row0 * D;
  const T* k = static_cast<const T*>(p.k) + k_row0 * D;
  const T* v = static_cast<const T*>(p.v) + k_row0 * D;

  load_tile_async<T, BM, D>(sQ, q, m0, s.len_q);
  if (t_begin < t_end) {
    load_tile_async<T, BN, D>(sK, k, t_begin * BN, s.len_k);
    load_tile_async<T, BN, D>(sV, v, t_begin * BN, s.len_k);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row_g = m0 + warp * 16 + g;  // this lane's rows: row_g and row_g + 8
  uint32_t qf[KT][4];
  load_a<KT, LD>(qf, sQ, warp * 16);
  float acc[D / 8][4];
  zero(acc);
  float m_run[2] = {-kInf, -kInf}, l_run[2] = {0.f, 0.f};  // running max (log2 units) and partial row sums
  const float scale_log2 = p.scale * kLog2e;

  for (int j = t_begin; j < t_end; ++j) {
    const int buf = (j - t_begin) & 1;
    if (j + 1 < t_end) {  // prefetch the next tile into the other buffer (last read in iteration j - 1)
      load_tile_async<T, BN, D>(sK + (buf ^ 1) * BN * LD, k, (j + 1) * BN, s.len_k);
      load_tile_async<T, BN, D>(sV + (buf ^ 1) * BN * LD, v, (j + 1) * BN, s.len_k);
    }
    cp_async_commit();  // possibly empty group, so that wait<1> below always means "tile j has landed"
    cp_async_wait<1>();
    __syncthreads();

    float sc[BN / 8][4];
    zero(sc);
    gemm_nt<T, KT, BN / 8, LD>(sc, qf, sK + buf * BN * LD);  // S = Q K^T

    float mx[2] = {-kInf, -kInf};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * BN + nt * 8 + 2 * t + (e & 1);
        const float x = is_visible(row_g + (e >> 1) * 8, col, s, p.causal) ? sc[nt][e] * scale_log2 : -kInf;
        sc[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_run[r], quad_max(mx[r]));
      m_use[r] = m_new == -kInf ? 0.f : m_new;  // all keys masked so far: avoid (-inf) - (-inf)
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[nt][e] = exp2f(sc[nt][e] - m_use[e >> 1]);
        l_run[e >> 1] += sc[nt][e];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[dt][e] *= alpha[e >> 1];
    }
    uint32_t pa[BN / 16][4];
    acc_to_a<T, BN / 16>(pa, sc);
    gemm_nn<T, BN / 16, D / 8, LD>(acc, pa, sV + buf * BN * LD);  // O += P V
    __syncthreads();  // everyone is done with buffer `buf` before iteration j + 1 refills it
  }

  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    // NOTE: "l == 0" (no visible key) rather than "l > 0": a NaN row sum (NaN in the row's inputs) must give NaN
    // out and lse, as the reference does, not the empty-row 0 / -inf
    inv[r] = l == 0.f ? 0.f : 1.f / l;
    lse[r] = l == 0.f ? -kInf : m_run[r] * kLn2 + logf(l);
  }
  if (p.num_splits == 1) {
    store_acc<T, D>(static_cast<T*>(p.o) + q_row0 * D, acc, row_g, s.len_q, inv);
  } else {
    float* o = p.o_partial + (split * p.total_q_rows + q_row0) * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_g + 8 * r >= s.len_q) continue;
      float* dst = o + static_cast<int64_t>(row_g + 8 * r) * D + 2 * t;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        dst[dt * 8] = acc[dt][2 * r] * inv[r];
        dst[dt * 8 + 1] = acc[dt][2 * r + 1] * inv[r];
      }
    }
  }
  if (t == 0) {
    float* lse_out = p.num_splits == 1 ? p.lse + q_row0 : p.lse_partial + split * p.total_q_rows + q_row0;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row_g + 8 * r < s.len_q) lse_out[row_g + 8 * r] = lse[r];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward, fp32 SIMT. Grid (cdiv(seqlen_q, 16), heads, batch * num_splits). Warp w owns query rows 4w..4w+3;
// for S, lane = key of the 32-key tile; for O, lane = head-dim column (D / 32 of them).
template <int D>
__global__ void __launch_bounds__(kThreads) fwd_simt_kernel(const Params p) {
  constexpr int BM = kSimtFwdBM, BN = kSimtFwdBN, RPW = BM / kWarps, DPL = D / 32;
  __shared__ float sQ[BM][D];
  __shared__ float sK[BN][D + 1];  // odd row stride: lane-per-row reads are bank-conflict free
  __shared__ float sV[BN][D];

  const int split = blockIdx.z % p.num_splits, b = blockIdx.z / p.num_splits, h = blockIdx.y;
  const Seq s = seq_info(p, b);
  const int m0 = blockIdx.x * BM;
  if (m0 >= s.len_q) return;
  int t_begin, t_end;
  fwd_key_tiles(m0, BM, BN, s, p.causal, split, p.num_splits, &t_begin, &t_end);
  const int64_t q_row0 = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, 0);
  const int64_t k_row0 = row_index(p.k_batch_rows, p.k_head_rows, b, h, s.k_start, 0);
  const float* q = static_cast<const float*>(p.q) + q_row0 * D;
  const float* k = static_cast<const float*>(p.k) + k_row0 * D;
  const float* v = static_cast<const float*>(p.v) + k_row0 * D;
  load_rows_simt<BM, D>(sQ, q, m0, s.len_q);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[RPW][DPL] = {}, m_run[RPW], l_run[RPW];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) m_run[rr] = -kInf, l_run[rr] = 0.f;
  const float scale_log2 = p.scale * kLog2e;

  for (int j = t_begin; j < t_end; ++j) {
    __syncthreads();  // previous tile fully consumed (and sQ written, on the first pass)
    load_rows_simt<BN, D>(sK, k, j * BN, s.len_k);
    load_rows_simt<BN, D>(sV, v, j * BN, s.len_k);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int rl = warp * RPW + rr;
      float x = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) x += sQ[rl][d] * sK[lane][d];
      x = is_visible(m0 + rl, j * BN + lane, s, p.causal) ? x * scale_log2 : -kInf;
      const float m_new = fmaxf(m_run[rr], warp_max(x));
      const float m_use = m_new == -kInf ? 0.f : m_new;
      const float alpha = exp2f(m_run[rr] - m_use);
      const float pr = exp2f(x - m_use);
      l_run[rr] = l_run[rr] * alpha + warp_sum(pr);
      m_run[rr] = m_new;
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        float o = acc[rr][c] * alpha;
        for (int jj = 0; jj < BN; ++jj) o += __shfl_sync(0xffffffffu, pr, jj) * sV[jj][lane + 32 * c];
        acc[rr][c] = o;
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int row = m0 + warp * RPW + rr;
    if (row >= s.len_q) continue;
    const float l = l_run[rr], inv = l == 0.f ? 0.f : 1.f / l;  // NaN l stays NaN (see fwd_mma_kernel)
    const float lse = l == 0.f ? -kInf : m_run[rr] * kLn2 + logf(l);
    const int64_t ri = q_row0 + row;
    float* o = p.num_splits == 1 ? static_cast<float*>(p.o) + ri * D
                                 : p.o_partial + (split * p.total_q_rows + ri) * D;
#pragma unroll
    for (int c = 0; c < DPL; ++c) o[lane + 32 * c] = acc[rr][c] * inv;
    if (lane == 0) (p.num_splits == 1 ? p.lse : p.lse_partial + split * p.total_q_rows)[ri] = lse;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Split-KV combine: lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) O_s; rows with lse = -inf get O = 0.
// Grid (cdiv(seqlen_q, 16), heads, batch), one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Seq s = seq_info(p, b);
  const int row_end = min(static_cast<int>(blockIdx.x + 1) * kRowsPerCta, s.len_q);
  for (int row = static_cast<int>(blockIdx.x) * kRowsPerCta + warp; row < row_end; row += kWarps) {
    const int64_t ri = row_index(p.q_batch_rows, p.q_head_rows, b, h, s.q_start, row);
    float mx = -kInf;
    bool nan = false;  // fmaxf drops NaN: a split whose inputs held NaN must still make the row NaN
    for (int sp = 0; sp < p.num_splits; ++sp) {
      const float x = p.lse_partial[sp * p.total_q_rows + ri];
      nan |= x != x;
      mx = fmaxf(mx, x);
    }
    float lse = nan ? kNaN : -kInf;
    if (mx != -kInf && !nan) {
      float sum = 0.f;
      for (int sp = 0; sp < p.num_splits; ++sp) sum += expf(p.lse_partial[sp * p.total_q_rows + ri] - mx);
      lse = mx + logf(sum);
    }
    for (int d = lane; d < D; d += 32) {
      float o = nan ? lse : 0.f;
      if (lse != -kInf && !nan) {
        for (int sp = 0; sp < p.num_splits; ++sp)
          o += expf(p.lse_partial[sp * p.total_q_rows + ri] - lse) * p.o_partial[(sp * p.total_q_rows + ri) * D + d];
      }
      static_cast<T*>(p.o)[ri * D + d] = from_f<T>(o);
    }
    if (lane == 0) p.lse[ri] = lse;
  }
}


}  // namespace

template <Dtype DT, int D>
cudaError_t attention_fwd_launch(const Params& p, cudaStream_t stream) {
  using T = typename Elem<DT>::T;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits) return cudaErrorInvalidValue;
  const int bm = fwd_tile_m(DT);
  const dim3 grid(static_cast<unsigned>(cdiv(p.seqlen_q, bm)), p.heads, p.batch * p.num_splits);
  cudaError_t err;
  if constexpr (DT == Dtype::kFloat32) {
    err = launch_kernel(fwd_simt_kernel<D>, grid, 0, p, stream);
  } else {
    const size_t smem = static_cast<size_t>(kMmaFwdBM + 4 * kMmaFwdBN) * (D + kPad) * sizeof(T);
    err = launch_kernel(fwd_mma_kernel<T, D>, grid, smem, p, stream);
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const dim3 grid_combine(static_cast<unsigned>(cdiv(p.seqlen_q, kRowsPerCta)), p.heads, p.batch);
  return launch_kernel(combine_kernel<T, D>, grid_combine, 0, p, stream);
}

DERA_ATTN_INSTANTIATE(attention_fwd_launch)

}  // namespace dera_fast::attn
