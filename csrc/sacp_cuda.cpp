// Torch glue for the SACP CUDA kernels: checks, the host-side tensor/chunk tables, current stream.
// Schemas (csrc/ops.cpp): gradient_gram(Tensor?[] a, Tensor?[] b, int[] groups, int num_groups) -> Tensor
//                         sacp_combine_(Tensor(a!)[] out, Tensor?[] a, Tensor?[] b, int[] groups, Tensor weights,
//                                       bool accumulate) -> ()
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <tuple>
#include <vector>

#include "common.h"
#include "sacp_kernels.h"

namespace dera_fast {
namespace {

using sacp::DType;
using OptList = c10::List<std::optional<at::Tensor>>;

DType to_dtype(at::ScalarType t, const char* what) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, what,
              " must be float32, bfloat16 or float16, got ", t);
  return t == at::kFloat ? DType::kFloat32 : (t == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16);
}

// Host tables for one call, copied to the device in one non-blocking copy from pinned memory (no host sync).
struct Plan {
  at::Tensor meta;                                   // device int64: tensors | seg | chunk tables
  int64_t tensors_off = 0, seg_off = 0, num_slots = 0;
  std::map<std::tuple<int, int, int>, std::pair<int64_t, int64_t>> launches;  // dtypes -> (offset, num_chunks)
};

// NOTE: plans are cached by their full content (addresses, sizes, dtypes, groups), so a training loop that reuses
// its gradient buffers pays no host work or copy after the first call, and a CUDA graph captured after a warm-up
// call replays with device tables that stay alive (the capture records no pinned host->device copy).
constexpr size_t kMaxPlans = 16;
std::mutex plans_mutex;
// Leaked on purpose: destroying CUDA tensors in static destructors at exit can run after the CUDA context is gone.
auto& plans = *new std::map<std::vector<int64_t>, Plan>();

Plan build_plan(const std::vector<int64_t>& desc, int64_t num_groups, const at::Device& device) {
  // desc: {device index, num_groups, then per entry: a, b, out, numel, group, a dtype, b dtype, out dtype}
  const int64_t n = (static_cast<int64_t>(desc.size()) - 2) / 8;
  auto e = [&](int64_t i, int k) { return desc[2 + 8 * i + k]; };
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return e(i, 4) < e(j, 4); });
  std::vector<int64_t> rows, seg(num_groups + 1, 0);
  std::map<std::tuple<int, int, int>, std::vector<int64_t>> chunks;
  int64_t slot = 0;
  for (int64_t i : order) {
    const int64_t t = static_cast<int64_t>(rows.size()) / sacp::kTensorRow;
    for (int k = 0; k < sacp::kTensorRow; ++k) rows.push_back(e(i, k));
    auto& ch = chunks[{static_cast<int>(e(i, 5)), static_cast<int>(e(i, 6)), static_cast<int>(e(i, 7))}];
    for (int64_t start = 0; start < e(i, 3); start += sacp::kChunk) {
      ch.insert(ch.end(), {t, start, slot++});  // group-sorted iteration: each group's slots are contiguous
      ++seg[e(i, 4) + 1];
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) seg[g + 1] += seg[g];
  Plan plan;
  plan.num_slots = slot;
  plan.seg_off = static_cast<int64_t>(rows.size());
  int64_t total = plan.seg_off + num_groups + 1;
  for (auto& [key, ch] : chunks) {
    plan.launches[key] = {total, static_cast<int64_t>(ch.size()) / sacp::kChunkRow};
    total += static_cast<int64_t>(ch.size());
  }
  auto host = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.data_ptr<int64_t>();
  p = std::copy(rows.begin(), rows.end(), p);
  p = std::copy(seg.begin(), seg.end(), p);
  for (auto& [key, ch] : chunks) p = std::copy(ch.begin(), ch.end(), p);
  plan.meta = host.to(device, /*non_blocking=*/true);  // the caching host allocator keeps `host` alive until done
  return plan;
}

Plan make_plan(const std::vector<std::optional<at::Tensor>>& a, const std::vector<std::optional<at::Tensor>>& b,
               const std::vector<at::Tensor>* out, at::IntArrayRef groups, int64_t num_groups,
               const at::Device& device) {
  std::vector<int64_t> desc = {device.index(), num_groups};
  desc.reserve(2 + 8 * a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i].has_value() ? *a[i] : *b[i];
    const int ta = static_cast<int>(to_dtype((a[i].has_value() ? *a[i] : x).scalar_type(), "grads_a"));
    const int tb = static_cast<int>(to_dtype((b[i].has_value() ? *b[i] : x).scalar_type(), "grads_b"));
    const int to = out ? static_cast<int>(to_dtype((*out)[i].scalar_type(), "out")) : ta;
    desc.insert(desc.end(), {a[i].has_value() ? reinterpret_cast<int64_t>(a[i]->data_ptr()) : 0,
                             b[i].has_value() ? reinterpret_cast<int64_t>(b[i]->data_ptr()) : 0,
                             out ? reinterpret_cast<int64_t>((*out)[i].data_ptr()) : 0, x.numel(), groups[i], ta,
                             tb, to});
  }
  const std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(desc);
  if (it != plans.end()) return it->second;
  if (plans.size() >= kMaxPlans) plans.clear();
  return plans.emplace(desc, build_plan(desc, num_groups, device)).first->second;
}

// Validate one pair list; return the entries as a vector and the device.
std::vector<std::optional<at::Tensor>> unpack(const OptList& list, const char* name) {
  std::vector<std::optional<at::Tensor>> v;
  v.reserve(list.size());
  for (const std::optional<at::Tensor>& t : list) {
    if (t.has_value()) {
      TORCH_CHECK(t->is_cuda(), name, " entries must be CUDA tensors");
      TORCH_CHECK(t->is_contiguous(), name, " entries must be contiguous");
      DERA_CHECK_FLOATING(*t);
    }
    v.push_back(t);
  }
  return v;
}

at::Device check_pairs(const std::vector<std::optional<at::Tensor>>& a, const std::vector<std::optional<at::Tensor>>& b,
                       at::IntArrayRef groups, int64_t num_groups) {
  TORCH_CHECK(a.size() == b.size() && a.size() == groups.size(), "a, b and groups must have the same length");
  std::optional<at::Device> device;
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].has_value() || b[i].has_value(), "entry ", i, " has neither gradient");
    TORCH_CHECK(groups[i] >= 0 && groups[i] < num_groups, "groups[", i, "] out of range");
    if (a[i].has_value() && b[i].has_value())
      TORCH_CHECK(a[i]->numel() == b[i]->numel(), "a[", i, "] and b[", i, "] differ in size");
    for (const auto* t : {&a[i], &b[i]}) {
      if (!t->has_value()) continue;
      if (!device) device = (*t)->device();
      TORCH_CHECK((*t)->device() == *device, "all gradients must be on one device");
    }
  }
  TORCH_CHECK(device.has_value(), "no gradient given");
  return *device;
}

at::Tensor gradient_gram_cuda(const OptList& a_list, const OptList& b_list, at::IntArrayRef groups,
                              int64_t num_groups) {
  auto a = unpack(a_list, "a");
  auto b = unpack(b_list, "b");
  const at::Device device = check_pairs(a, b, groups, num_groups);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Plan plan = make_plan(a, b, nullptr, groups, num_groups, device);
  auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(plan.num_slots, 1), 3}, opts);
  at::Tensor gram = at::zeros({num_groups, 3}, opts);
  const int64_t* meta = plan.meta.data_ptr<int64_t>();
  for (const auto& [key, launch] : plan.launches) {
    C10_CUDA_CHECK(sacp::gram_partials_launch(meta, meta + launch.first, launch.second,
                                              static_cast<DType>(std::get<0>(key)),
                                              static_cast<DType>(std::get<1>(key)), partials.data_ptr<float>(),
                                              stream));
  }
  C10_CUDA_CHECK(sacp::gram_reduce_launch(partials.data_ptr<float>(), meta + plan.seg_off, num_groups,
                                          gram.data_ptr<float>(), stream));
  return gram;
}

void sacp_combine_cuda(at::TensorList out_list, const OptList& a_list, const OptList& b_list,
                       at::IntArrayRef groups, const at::Tensor& weights, bool accumulate) {
  auto a = unpack(a_list, "a");
  auto b = unpack(b_list, "b");
  const at::Device device = check_pairs(a, b, groups, weights.size(0));
  DERA_CHECK_DIM(weights, 2);
  DERA_CHECK_DTYPE(weights, at::kFloat);
  DERA_CHECK_CONTIGUOUS(weights);
  TORCH_CHECK(weights.size(1) == 2 && weights.device() == device, "weights must be [G, 2] on the gradients' device");
  std::vector<at::Tensor> out(out_list.begin(), out_list.end());
  TORCH_CHECK(out.size() == a.size(), "out must have one tensor per gradient");
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i].device() == device && out[i].is_contiguous(), "out[", i, "] must be contiguous on ", device);
    TORCH_CHECK(out[i].numel() == (a[i].has_value() ? *a[i] : *b[i]).numel(), "out[", i, "] has the wrong size");
  }
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Plan plan = make_plan(a, b, &out, groups, weights.size(0), device);
  const int64_t* meta = plan.meta.data_ptr<int64_t>();
  for (const auto& [key, launch] : plan.launches) {
    C10_CUDA_CHECK(sacp::combine_launch(meta, meta + launch.first, launch.second,
                                        static_cast<DType>(std::get<0>(key)), static_cast<DType>(std::get<1>(key)),
                                        static_cast<DType>(std::get<2>(key)), weights.data_ptr<float>(), accumulate,
                                        stream));
  }
}

}  // namespace
}  // namespace dera_fast

TORCH_LIBRARY_IMPL(dera_fast_C, CUDA, m) {
  m.impl("gradient_gram", &dera_fast::gradient_gram_cuda);
  m.impl("sacp_combine_", &dera_fast::sacp_combine_cuda);
}
