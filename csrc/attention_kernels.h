// Torch-free interface of the fused attention CUDA kernels (csrc/attention_kernels.cu).
//
// Layouts (see the attention schemas in csrc/ops.cpp). Every q-like tensor (q, out, dout, dq) is row-major
// [rows, D] once flattened, and so is every k-like one (k, v, dk, dv):
//   dense  : q [B, H, Lq, D], k/v [B, H, Lk, D]; "batch" = B;
//   varlen : q [1, H, Tq, D], k/v [1, H, Tk, D] packed; "batch" = S sequences delimited by cu_seqlens_q/k.
// Row r of sequence/batch b, head h sits at flat row  b * batch_rows + h * head_rows + start(b) + r, which is
// also its index in lse/delta ([B, H, Lq] or [1, H, Tq]).
//
// The index arithmetic (sequence bounds, causal limits, tile ranges, split-KV ranges) lives here in small inline
// functions usable on host and device, so that tests/test_attention_cuda_host.py can check it on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDACC__)
#define DERA_ATTN_HD __host__ __device__ __forceinline__
#else
#define DERA_ATTN_HD inline
#endif

namespace dera_fast::attn {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// Tile sizes of the forward kernels (the glue needs them to pick the split-KV count).
// 16-bit inputs: mma.sync FA2 kernel, 4 warps x 16 query rows, K/V tiles of 64 keys.
constexpr int kMmaFwdBM = 64;
constexpr int kMmaFwdBN = 64;
// fp32 inputs: SIMT kernel, 4 warps x 4 query rows, K/V tiles of 32 keys (one key per lane).
constexpr int kSimtFwdBM = 16;
constexpr int kSimtFwdBN = 32;
// Split-KV: at most this many partial results per query row.
constexpr int kMaxSplits = 16;

DERA_ATTN_HD int fwd_tile_m(Dtype dt) { return dt == Dtype::kFloat32 ? kSimtFwdBM : kMmaFwdBM; }
DERA_ATTN_HD int fwd_tile_n(Dtype dt) { return dt == Dtype::kFloat32 ? kSimtFwdBN : kMmaFwdBN; }
DERA_ATTN_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Params {
  // Inputs (element type given by the launcher's Dtype).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Forward: outputs. Backward: the forward's outputs, read only.
  void* o = nullptr;
  float* lse = nullptr;  // natural log, one per q row
  // Backward only.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;  // workspace, one per q row: rowsum(dout * o)
  // Varlen: int32 [batch + 1] prefix offsets on the device; both nullptr in dense mode.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int batch = 0;     // B (dense) or number of sequences S (varlen)
  int heads = 0;
  int seqlen_q = 0;  // dense: Lq; varlen: an upper bound of the per-sequence lengths (sets the grid)
  int seqlen_k = 0;
  int64_t q_batch_rows = 0, q_head_rows = 0;  // dense: H*Lq, Lq; varlen: 0, Tq
  int64_t k_batch_rows = 0, k_head_rows = 0;
  float scale = 1.f;
  bool causal = false;
  int q_offset = 0;  // dense causal offset (varlen uses len_k - len_q per sequence)
  // Split-KV forward: num_splits > 1 writes fp32 partials [num_splits, total_q_rows, D] and their lse
  // [num_splits, total_q_rows] to the workspaces, then a combine kernel writes o and lse.
  int num_splits = 1;
  int64_t total_q_rows = 0;
  float* o_partial = nullptr;
  float* lse_partial = nullptr;
};

// One sequence (varlen) or one batch entry (dense).
struct Seq {
  int64_t q_start;
  int64_t k_start;
  int len_q;
  int len_k;
  int64_t causal_offset;  // key j is visible to query i iff j <= i + causal_offset (when causal)
};

DERA_ATTN_HD Seq seq_info(const Params& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
    const int k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
    return Seq{q0, k0, q1 - q0, k1 - k0, static_cast<int64_t>(k1 - k0) - (q1 - q0)};
  }
  return Seq{0, 0, p.seqlen_q, p.seqlen_k, p.q_offset};
}

DERA_ATTN_HD int64_t row_index(int64_t batch_rows, int64_t head_rows, int b, int h, int64_t start, int64_t r) {
  return b * batch_rows + h * head_rows + start + r;
}

DERA_ATTN_HD bool is_visible(int64_t row, int64_t col, const Seq& s, bool causal) {
  return col >= 0 && col < s.len_k && (!causal || col <= row + s.causal_offset);
}

// Number of keys visible to query row `row` (they are keys 0 .. n-1).
DERA_ATTN_HD int visible_keys(int64_t row, const Seq& s, bool causal) {
  if (!causal) return s.len_k;
  const int64_t n = row + s.causal_offset + 1;
  return n < 0 ? 0 : (n > s.len_k ? s.len_k : static_cast<int>(n));
}

// Key tiles [*begin, *end) that split `split` of `num_splits` must visit for the query tile starting at row m0.
// The sequence's key tiles are dealt out in equal contiguous chunks, then clipped to the causal limit of the
// tile's last row; a split may get an empty range (it then writes out = 0, lse = -inf, neutral in the combine).
DERA_ATTN_HD void fwd_key_tiles(int m0, int bm, int bn, const Seq& s, bool causal, int split, int num_splits,
                                int* begin, int* end) {
  const int last_row = (m0 + bm < s.len_q ? m0 + bm : s.len_q) - 1;
  const int limit = static_cast<int>(cdiv(visible_keys(last_row, s, causal), bn));
  const int per_split = static_cast<int>(cdiv(cdiv(s.len_k, bn), num_splits));
  int b0 = split * per_split, e0 = b0 + per_split;
  if (e0 > limit) e0 = limit;
  if (e0 < b0) e0 = b0;
  *begin = b0;
  *end = e0;
}

// First query tile (of bm rows) holding a query that sees key n0 (the first key of a K tile): with causal
// masking, query i sees key n0 iff i >= n0 - causal_offset. Query tiles run up to cdiv(len_q, bm).
DERA_ATTN_HD int bwd_first_q_tile(int n0, int bm, const Seq& s, bool causal) {
  if (!causal) return 0;
  const int64_t i0 = static_cast<int64_t>(n0) - s.causal_offset;
  if (i0 <= 0) return 0;
  return i0 >= s.len_q ? static_cast<int>(cdiv(s.len_q, bm)) : static_cast<int>(i0 / bm);
}

// Split-KV heuristic: split only when the (query tile, head, batch) CTAs fill less than one wave of SMs, and
// then into about as many splits as fill one wave, never more than the key tiles or kMaxSplits.
DERA_ATTN_HD int choose_num_splits(int64_t ctas, int num_sms, int64_t key_tiles) {
  if (ctas <= 0 || ctas >= num_sms || key_tiles <= 1) return 1;
  int64_t s = num_sms / ctas;
  if (s > key_tiles) s = key_tiles;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

inline int fwd_num_splits(Dtype dt, int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k,
                          int num_sms) {
  const int64_t ctas = batch * heads * cdiv(seqlen_q, fwd_tile_m(dt));
  return choose_num_splits(ctas, num_sms, cdiv(seqlen_k, fwd_tile_n(dt)));
}

// Launchers (explicitly instantiated in attention_kernels.cu for D in {32, 64, 96, 128} and every Dtype).
// fwd: writes p.o and p.lse (via the workspaces and a combine kernel when p.num_splits > 1).
// bwd: writes p.delta (workspace), then p.dk/p.dv and p.dq; deterministic (no atomics).
// Both return the first CUDA error (launch errors only; the kernels run asynchronously on `stream`).
template <Dtype DT, int D>
cudaError_t attention_fwd_launch(const Params& p, cudaStream_t stream);
template <Dtype DT, int D>
cudaError_t attention_bwd_launch(const Params& p, cudaStream_t stream);

}  // namespace dera_fast::attn
