// Torch glue for the fused attention CUDA kernels (attention_kernels.cu / attention_kernels_bwd.cu): argument
// checks, output and workspace allocation, dtype and head-dim dispatch, the current stream, the split-KV count.
// Schemas: csrc/ops.cpp ("attention" section). Python side (fake kernels, autograd): dera_fast/ops/attention.py.
// c10/cuda headers rather than ATen/cuda/CUDAContext.h: same current stream, without pulling in the cuBLAS and
// cuSPARSE headers (so the file can be syntax-checked against a CPU torch wheel plus the bare CUDA runtime).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>
#include <tuple>

#include "attention_kernels.h"
#include "common.h"

namespace dera_fast {
namespace {

using attn::Dtype;

Dtype to_attn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "attention: unsupported dtype ", t);
  }
}

template <Dtype DT>
cudaError_t launch_head_dim(bool forward, int64_t d, const attn::Params& p, cudaStream_t stream) {
  switch (d) {
    case 32: return forward ? attn::attention_fwd_launch<DT, 32>(p, stream) : attn::attention_bwd_launch<DT, 32>(p, stream);
    case 64: return forward ? attn::attention_fwd_launch<DT, 64>(p, stream) : attn::attention_bwd_launch<DT, 64>(p, stream);
    case 96: return forward ? attn::attention_fwd_launch<DT, 96>(p, stream) : attn::attention_bwd_launch<DT, 96>(p, stream);
    case 128:
      return forward ? attn::attention_fwd_launch<DT, 128>(p, stream) : attn::attention_bwd_launch<DT, 128>(p, stream);
    default: TORCH_CHECK(false, "attention: head dim must be 32, 64, 96 or 128, got ", d);
  }
}

void launch(const char* op, bool forward, at::ScalarType t, int64_t d, const attn::Params& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (to_attn_dtype(t)) {
    case Dtype::kFloat32: err = launch_head_dim<Dtype::kFloat32>(forward, d, p, stream); break;
    case Dtype::kFloat16: err = launch_head_dim<Dtype::kFloat16>(forward, d, p, stream); break;
    case Dtype::kBFloat16: err = launch_head_dim<Dtype::kBFloat16>(forward, d, p, stream); break;
  }
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

bool aligned16(const at::Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; }

// Checks shared by forward and backward; fills the layout part of `p` (everything but the data pointers).
void check_and_fill(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, int64_t q_offset,
                    attn::Params& p) {
  DERA_CHECK_DIM(q, 4);
  DERA_CHECK_DIM(k, 4);
  DERA_CHECK_DIM(v, 4);
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  DERA_CHECK_SAME_DEVICE(q, k);
  DERA_CHECK_SAME_DEVICE(q, v);
  DERA_CHECK_FLOATING(q);
  DERA_CHECK_DTYPE(k, q.scalar_type());
  DERA_CHECK_DTYPE(v, q.scalar_type());
  DERA_CHECK_CONTIGUOUS(q);
  DERA_CHECK_CONTIGUOUS(k);
  DERA_CHECK_CONTIGUOUS(v);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
              ": q [B, H, Lq, D] and k [B, H, Lk, D] disagree: ", q.sizes(), " vs ", k.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 32 || d == 64 || d == 96 || d == 128, op, ": head dim must be 32, 64, 96 or 128, got ", d);
  TORCH_CHECK(aligned16(q) && aligned16(k) && aligned16(v), op, ": q, k, v must be 16-byte aligned");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(2) <= kIntMax && k.size(2) <= kIntMax, op, ": sequence dims must fit in int32");
  TORCH_CHECK(q.size(1) <= 65535, op, ": at most 65535 heads, got ", q.size(1));
  TORCH_CHECK(q_offset >= -kIntMax && q_offset <= kIntMax, op, ": q_offset out of int32 range");
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
              ": cu_seqlens_q and cu_seqlens_k must be given together");

  p.heads = static_cast<int>(q.size(1));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.q_offset = static_cast<int>(q_offset);
  if (cu_seqlens_q.has_value()) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    for (const at::Tensor* c : {&cq, &ck}) {
      TORCH_CHECK(c->scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", c->scalar_type());
      TORCH_CHECK(c->dim() == 1 && c->numel() >= 2, op, ": cu_seqlens must be 1-D with at least 2 entries");
      TORCH_CHECK(c->is_contiguous(), op, ": cu_seqlens must be contiguous");
      TORCH_CHECK(c->device() == q.device(), op, ": cu_seqlens must be on the device of q");
    }
    TORCH_CHECK(cq.numel() == ck.numel(), op, ": cu_seqlens_q and cu_seqlens_k must have the same length");
    TORCH_CHECK(q.size(0) == 1, op, ": varlen mode packs sequences along dim 2, so q must be [1, H, Tq, D]");
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= q.size(2) && max_seqlen_k >= 0 && max_seqlen_k <= k.size(2),
                op, ": max_seqlen_q/k must lie in [0, Tq] and [0, Tk], got ", max_seqlen_q, ", ", max_seqlen_k);
    TORCH_CHECK(cq.numel() - 1 <= 65535, op, ": at most 65535 sequences");
    p.cu_seqlens_q = cq.data_ptr<int>();
    p.cu_seqlens_k = ck.data_ptr<int>();
    p.batch = static_cast<int>(cq.numel() - 1);
    p.seqlen_q = static_cast<int>(max_seqlen_q);
    p.seqlen_k = static_cast<int>(max_seqlen_k);
    p.q_batch_rows = 0;
    p.k_batch_rows = 0;
  } else {
    TORCH_CHECK(q.size(0) <= 65535, op, ": at most 65535 batch entries, got ", q.size(0));
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(2));
    p.seqlen_k = static_cast<int>(k.size(2));
    p.q_batch_rows = q.size(1) * q.size(2);
    p.k_batch_rows = k.size(1) * k.size(2);
  }
  p.q_head_rows = q.size(2);
  p.k_head_rows = k.size(2);
  p.total_q_rows = q.size(0) * q.size(1) * q.size(2);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, double scale, bool causal, int64_t q_offset) {
  attn::Params p;
  check_and_fill("attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                 q_offset, p);
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Varlen: rows outside every sequence (a cu_seqlens that does not cover the packed dim) stay 0 / -inf.
  at::Tensor out = varlen ? at::zeros_like(q) : at::empty_like(q);
  const auto lse_opts = q.options().dtype(at::kFloat);
  at::Tensor lse = varlen ? at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<float>::infinity(),
                                     lse_opts)
                          : at::empty({q.size(0), q.size(1), q.size(2)}, lse_opts);
  if (q.numel() == 0) return {out, lse};

  const Dtype dt = to_attn_dtype(q.scalar_type());
  int num_sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.get_device());
  TORCH_CHECK(err == cudaSuccess, "attention_fwd: cannot query the SM count: ", cudaGetErrorString(err));
  int splits = attn::fwd_num_splits(dt, p.batch, p.heads, p.seqlen_q, p.seqlen_k, num_sms);
  if (static_cast<int64_t>(splits) * p.batch > 65535) splits = 65535 / p.batch;  // grid.z = batch * splits
  at::Tensor o_partial, lse_partial;
  if (splits > 1) {
    o_partial = at::empty({splits, p.total_q_rows, q.size(3)}, lse_opts);
    lse_partial = at::empty({splits, p.total_q_rows}, lse_opts);
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  p.num_splits = splits;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launch("attention_fwd", true, q.scalar_type(), q.size(3), p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, int64_t q_offset) {
  attn::Params p;
  check_and_fill("attention_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                 q_offset, p);
  const at::Tensor dout = dout_in.contiguous();  // autograd may hand over expanded / strided gradients
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_bwd: dout and out must have the "
              "shape of q ", q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  DERA_CHECK_DTYPE(dout, q.scalar_type());
  DERA_CHECK_DTYPE(out, q.scalar_type());
  DERA_CHECK_DTYPE(lse, at::kFloat);
  DERA_CHECK_SAME_DEVICE(q, dout);
  DERA_CHECK_SAME_DEVICE(q, out);
  DERA_CHECK_SAME_DEVICE(q, lse);
  DERA_CHECK_CONTIGUOUS(out);
  DERA_CHECK_CONTIGUOUS(lse);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "attention_bwd: lse must be [", q.size(0), ", ", q.size(1), ", ", q.size(2), "], got ", lse.sizes());
  TORCH_CHECK(aligned16(dout) && aligned16(out), "attention_bwd: dout and out must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Varlen: rows outside every sequence get zero gradients.
  at::Tensor dq = varlen ? at::zeros_like(q) : at::empty_like(q);
  at::Tensor dk = varlen ? at::zeros_like(k) : at::empty_like(k);
  at::Tensor dv = varlen ? at::zeros_like(v) : at::empty_like(v);
  // Empty Lq or Lk needs no special case: the kernels then write zero gradients.
  at::Tensor delta = at::empty({p.total_q_rows}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  launch("attention_bwd", false, q.scalar_type(), q.size(3), p);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace dera_fast

TORCH_LIBRARY_IMPL(dera_fast_C, CUDA, m) {
  m.impl("attention_fwd", &dera_fast::attention_fwd);
  m.impl("attention_bwd", &dera_fast::attention_bwd);
}
