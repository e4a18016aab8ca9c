// Torch glue of the VQ op family on CUDA: input checks, dtype switch, current stream, output allocation, and a
// call to the torch-free launchers of vq_kernels.cu. Compiled only in CUDA builds (setup.py).
//
// NOTE: the stream and device guard come from the c10/cuda headers (c10::cuda::getCurrentCUDAStream is what
// at::cuda::getCurrentCUDAStream forwards to); ATen/cuda/CUDAContext.h would also pull in cuBLAS / cuSPARSE /
// cuSOLVER headers that these ops do not use.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"
#include "vq_kernels.h"

namespace {

// Calls fn with a null pointer of the CUDA element type of x (float, __half or __nv_bfloat16).
template <typename Fn>
void with_cuda_dtype(const at::Tensor& x, const char* name, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

template <typename T>
const T* ptr(const at::Tensor& x) {
  return reinterpret_cast<const T*>(x.data_ptr());
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "dera_fast: CUDA kernel ", kernel, " failed: ", cudaGetErrorString(err));
}

// Shared checks: x [N, D] on CUDA and codebook [K, D], both contiguous; returns (N, K, D).
std::tuple<int64_t, int64_t, int64_t> check_pair(const at::Tensor& x, const at::Tensor& codebook) {
  DERA_CHECK_DIM(x, 2);
  DERA_CHECK_DIM(codebook, 2);
  DERA_CHECK_FLOATING(x);
  DERA_CHECK_CONTIGUOUS(x);
  DERA_CHECK_CONTIGUOUS(codebook);
  DERA_CHECK_SAME_DEVICE(x, codebook);
  TORCH_CHECK(x.is_cuda(), "expected CUDA tensors, got ", x.device());
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);
  TORCH_CHECK(codebook.size(1) == D, "codebook must have D = ", D, " columns, got ", codebook.size(1));
  TORCH_CHECK(K > 0, "codebook must have at least one code");
  TORCH_CHECK(K < std::numeric_limits<int32_t>::max(), "codebook too large: K = ", K);
  TORCH_CHECK(D >= 1 && D <= dera_fast::vq::kMaxDim, "D must be in [1, ", dera_fast::vq::kMaxDim, "], got ", D);
  return {N, K, D};
}

void check_rows(const at::Tensor& x, const char* name, int64_t N, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == N, name, " must be 1-D of length ", N, ", got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ", x.device());
}

void check_inv_temperature(double inv_temperature) {
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
}

at::Tensor vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& bias) {
  const auto [N, K, D] = check_pair(z, codebook);
  DERA_CHECK_DTYPE(codebook, at::kFloat);
  check_rows(bias, "bias", K, at::kFloat, z);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor ids = at::empty({N}, z.options().dtype(at::kLong));
  with_cuda_dtype(z, "z", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(dera_fast::vq::vq_nearest<T>(ptr<T>(z), codebook.data_ptr<float>(), bias.data_ptr<float>(),
                                              ids.data_ptr<int64_t>(), N, K, D,
                                              c10::cuda::getCurrentCUDAStream().stream()),
                 "vq_nearest_kernel");
  });
  return ids;
}

at::Tensor vq_sample_cuda(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& u,
                          double inv_temperature) {
  const auto [N, K, D] = check_pair(z, codebook);
  DERA_CHECK_DTYPE(codebook, at::kFloat);
  check_rows(u, "u", N, at::kFloat, z);
  check_inv_temperature(inv_temperature);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor ids = at::empty({N}, z.options().dtype(at::kLong));
  with_cuda_dtype(z, "z", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(dera_fast::vq::vq_sample<T>(ptr<T>(z), codebook.data_ptr<float>(), u.data_ptr<float>(),
                                             static_cast<float>(inv_temperature), ids.data_ptr<int64_t>(), N, K,
                                             D, c10::cuda::getCurrentCUDAStream().stream()),
                 "vq_sample_kernel");
  });
  return ids;
}

std::tuple<at::Tensor, at::Tensor> codebook_ce_fwd_cuda(const at::Tensor& h, const at::Tensor& codebook,
                                                        const at::Tensor& target, double inv_temperature) {
  const auto [N, K, D] = check_pair(h, codebook);
  DERA_CHECK_DTYPE(codebook, h.scalar_type());
  check_rows(target, "target", N, at::kLong, h);
  check_inv_temperature(inv_temperature);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor loss = at::empty({N}, h.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({N}, h.options().dtype(at::kFloat));
  with_cuda_dtype(h, "h", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(dera_fast::vq::codebook_ce_fwd<T>(ptr<T>(h), ptr<T>(codebook), target.data_ptr<int64_t>(),
                                                   static_cast<float>(inv_temperature), loss.data_ptr<float>(),
                                                   lse.data_ptr<float>(), N, K, D,
                                                   c10::cuda::getCurrentCUDAStream().stream()),
                 "ce_fwd_kernel");
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> codebook_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& h,
                                                        const at::Tensor& codebook, const at::Tensor& target,
                                                        const at::Tensor& lse, double inv_temperature) {
  const auto [N, K, D] = check_pair(h, codebook);
  DERA_CHECK_DTYPE(codebook, h.scalar_type());
  check_rows(grad_loss, "grad_loss", N, at::kFloat, h);
  check_rows(target, "target", N, at::kLong, h);
  check_rows(lse, "lse", N, at::kFloat, h);
  check_inv_temperature(inv_temperature);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor grad_h = at::empty({N, D}, h.options().dtype(at::kFloat));
  at::Tensor grad_codebook = at::empty({K, D}, h.options().dtype(at::kFloat));  // every entry is written
  with_cuda_dtype(h, "h", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check_launch(dera_fast::vq::codebook_ce_bwd<T>(grad_loss.data_ptr<float>(), ptr<T>(h), ptr<T>(codebook),
                                                   target.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                                   static_cast<float>(inv_temperature), grad_h.data_ptr<float>(),
                                                   grad_codebook.data_ptr<float>(), N, K, D,
                                                   c10::cuda::getCurrentCUDAStream().stream()),
                 "ce_bwd_h_kernel / ce_bwd_codebook_kernel");
  });
  return {grad_h, grad_codebook};
}

}  // namespace

TORCH_LIBRARY_IMPL(dera_fast_C, CUDA, m) {
  m.impl("vq_nearest", &vq_nearest_cuda);
  m.impl("vq_sample", &vq_sample_cuda);
  m.impl("codebook_ce_fwd", &codebook_ce_fwd_cuda);
  m.impl("codebook_ce_bwd", &codebook_ce_bwd_cuda);
}
