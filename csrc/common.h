// Host-side helpers shared by the torch glue files (*_cpu.cpp, *_cuda.cpp). Not included by .cu files.
#pragma once
#include <torch/all.h>

#define DERA_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define DERA_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be " #d "-D, got ", (x).dim(), "-D")
#define DERA_CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be ", (t), ", got ", (x).scalar_type())
#define DERA_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define DERA_CHECK_FLOATING(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                     \
                  (x).scalar_type() == at::kBFloat16,                                                   \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

namespace dera_fast {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace dera_fast
