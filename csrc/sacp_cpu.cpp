// CPU kernels of the SACP ops (same schemas as the CUDA ones, see csrc/ops.cpp). Tensors are processed in
// parallel, each with a double accumulator; the per-group sums then run in list order, so results are
// deterministic and independent of the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dera_fast {
namespace {

using OptList = c10::List<std::optional<at::Tensor>>;

// Call f(T{}) with T the C++ type of a float32/bfloat16/float16 tensor dtype.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "SACP gradients must be float32, bfloat16 or float16, got ", t);
  }
}

struct Pairs {
  std::vector<const at::Tensor*> a, b;  // nullptr = None
  int64_t size() const { return static_cast<int64_t>(a.size()); }
};

Pairs check(const OptList& a_list, const OptList& b_list, at::IntArrayRef groups, int64_t num_groups,
            std::vector<at::Tensor>& keep) {
  TORCH_CHECK(a_list.size() == b_list.size() && a_list.size() == groups.size(),
              "a, b and groups must have the same length");
  Pairs p;
  keep.reserve(2 * a_list.size());
  for (size_t i = 0; i < a_list.size(); ++i) {
    TORCH_CHECK(groups[i] >= 0 && groups[i] < num_groups, "groups[", i, "] out of range");
    std::optional<at::Tensor> a = a_list.get(i), b = b_list.get(i);
    TORCH_CHECK(a.has_value() || b.has_value(), "entry ", i, " has neither gradient");
    for (auto* t : {&a, &b}) {
      if (!t->has_value()) continue;
      TORCH_CHECK((*t)->device().is_cpu() && (*t)->is_contiguous(), "gradients must be contiguous CPU tensors");
      DERA_CHECK_FLOATING(**t);
    }
    if (a.has_value() && b.has_value()) TORCH_CHECK(a->numel() == b->numel(), "a[", i, "] and b[", i, "] differ");
    p.a.push_back(a.has_value() ? &keep.emplace_back(*a) : nullptr);
    p.b.push_back(b.has_value() ? &keep.emplace_back(*b) : nullptr);
  }
  return p;
}

template <typename TA, typename TB>
void gram_one(const TA* a, const TB* b, int64_t n, double* v) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = a ? static_cast<double>(static_cast<float>(a[i])) : 0.0;
    const double y = b ? static_cast<double>(static_cast<float>(b[i])) : 0.0;
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  v[0] = ab, v[1] = aa, v[2] = bb;
}

at::Tensor gradient_gram_cpu(const OptList& a_list, const OptList& b_list, at::IntArrayRef groups,
                             int64_t num_groups) {
  std::vector<at::Tensor> keep;
  const Pairs p = check(a_list, b_list, groups, num_groups, keep);
  std::vector<double> per(3 * p.size(), 0.0);
  int64_t total = 0;
  for (int64_t i = 0; i < p.size(); ++i) total += (p.a[i] ? *p.a[i] : *p.b[i]).numel();
  // NOTE: below ~64K elements a parallel region costs more than the work: one thread takes every tensor
  const int64_t grain = total < (int64_t{1} << 16) ? std::max<int64_t>(p.size(), 1) : 1;
  at::parallel_for(0, p.size(), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const at::Tensor& x = p.a[i] ? *p.a[i] : *p.b[i];
      dispatch_float((p.a[i] ? *p.a[i] : x).scalar_type(), [&](auto ta) {
        dispatch_float((p.b[i] ? *p.b[i] : x).scalar_type(), [&](auto tb) {
          using TA = decltype(ta);
          using TB = decltype(tb);
          gram_one<TA, TB>(p.a[i] ? p.a[i]->const_data_ptr<TA>() : nullptr,
                           p.b[i] ? p.b[i]->const_data_ptr<TB>() : nullptr, x.numel(), &per[3 * i]);
        });
      });
    }
  });
  std::vector<double> acc(3 * num_groups, 0.0);
  for (int64_t i = 0; i < p.size(); ++i)
    for (int k = 0; k < 3; ++k) acc[3 * groups[i] + k] += per[3 * i + k];
  at::Tensor gram = at::empty({num_groups, 3}, at::TensorOptions().dtype(at::kFloat));
  float* g = gram.data_ptr<float>();
  for (int64_t j = 0; j < 3 * num_groups; ++j) g[j] = static_cast<float>(acc[j]);
  return gram;
}

void sacp_combine_cpu(at::TensorList out, const OptList& a_list, const OptList& b_list, at::IntArrayRef groups,
                      const at::Tensor& weights, bool accumulate) {
  DERA_CHECK_DIM(weights, 2);
  DERA_CHECK_DTYPE(weights, at::kFloat);
  TORCH_CHECK(weights.size(1) == 2 && weights.device().is_cpu(), "weights must be a CPU [G, 2] tensor");
  std::vector<at::Tensor> keep;
  const Pairs p = check(a_list, b_list, groups, weights.size(0), keep);
  TORCH_CHECK(static_cast<int64_t>(out.size()) == p.size(), "out must have one tensor per gradient");
  const at::Tensor w = weights.contiguous();
  const float* wp = w.const_data_ptr<float>();
  for (int64_t i = 0; i < p.size(); ++i) {
    const at::Tensor& x = p.a[i] ? *p.a[i] : *p.b[i];
    TORCH_CHECK(out[i].device().is_cpu() && out[i].is_contiguous() && out[i].numel() == x.numel(),
                "out[", i, "] must be a contiguous CPU tensor of the gradient's size");
    const float w_a = wp[2 * groups[i]], w_b = wp[2 * groups[i] + 1];
    dispatch_float((p.a[i] ? *p.a[i] : x).scalar_type(), [&](auto ta) {
      dispatch_float((p.b[i] ? *p.b[i] : x).scalar_type(), [&](auto tb) {
        dispatch_float(out[i].scalar_type(), [&](auto to) {
          using TA = decltype(ta);
          using TB = decltype(tb);
          using TO = decltype(to);
          const TA* a = p.a[i] ? p.a[i]->const_data_ptr<TA>() : nullptr;
          const TB* b = p.b[i] ? p.b[i]->const_data_ptr<TB>() : nullptr;
          TO* o = out[i].data_ptr<TO>();
          at::parallel_for(0, x.numel(), 32768, [&](int64_t lo, int64_t hi) {
            for (int64_t j = lo; j < hi; ++j) {
              float y = (a ? w_a * static_cast<float>(a[j]) : 0.f) + (b ? w_b * static_cast<float>(b[j]) : 0.f);
              if (accumulate) y += static_cast<float>(o[j]);
              o[j] = static_cast<TO>(y);
            }
          });
        });
      });
    });
  }
}

}  // namespace
}  // namespace dera_fast

TORCH_LIBRARY_IMPL(dera_fast_C, CPU, m) {
  m.impl("gradient_gram", &dera_fast::gradient_gram_cpu);
  m.impl("sacp_combine_", &dera_fast::sacp_combine_cpu);
}
