// dera_fast._C: every operator schema of the `dera_fast_C` namespace lives in this one file.
//
// The module itself is empty (no pybind11): importing it runs the static TORCH_LIBRARY initialisers below and
// the TORCH_LIBRARY_IMPL blocks of the per-op files (<op>_cpu.cpp for CPU kernels, <op>_cuda.cpp for the CUDA
// glue around the torch-free <op>_kernels.cu). Python adds register_fake / register_autograd on top
// (dera_fast/ops/<op>.py), so every op traces under torch.compile(fullgraph=True).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace dera_fast {
std::string vq_nearest_cpu_isa();  // csrc/vq_cpu.cpp
}

extern "C" {
// Empty module: `import dera_fast._C` only has to load this shared object.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dera_fast_C, m) {
  // ---- vq (dera_fast/ops/vq.py) ----
  // z: [N, D] fp32/bf16/fp16; codebook: [K, D] fp32 (already l2-normalised for the cosine metric);
  // bias: [K] fp32. Returns int64 [N]: argmin_k (bias[k] - 2 <z, c_k>), first index on ties.
  m.def("vq_nearest(Tensor z, Tensor codebook, Tensor bias) -> Tensor");
  // Which variant the CPU vq_nearest kernel runs on this machine: "amx" (AVX-512 tile + AMX-BF16 screen),
  // "avx512", "avx2" or "scalar" (capped by DERA_FAST_CPU_ISA, read once per process).
  m.def("vq_nearest_cpu_isa() -> str", &dera_fast::vq_nearest_cpu_isa);
  // z: [N, D] (any norm); codebook: [K, D] fp32, l2-normalised; u: [N] fp32 uniforms in [0, 1).
  // Returns int64 [N]: the inverse-CDF sample of softmax_k(cos(z, c_k) * inv_temperature) at u.
  m.def("vq_sample(Tensor z, Tensor codebook, Tensor u, float inv_temperature) -> Tensor");
  // h: [N, D] and codebook: [K, D], same dtype, both already l2-normalised; target: int64 [N].
  // Returns (loss [N] fp32, lse [N] fp32) for logits = <h, c_k> * inv_temperature.
  m.def("codebook_ce_fwd(Tensor h, Tensor codebook, Tensor target, float inv_temperature) -> (Tensor, Tensor)");
  // grad_loss: [N] fp32. Returns (grad_h [N, D] fp32, grad_codebook [K, D] fp32).
  m.def("codebook_ce_bwd(Tensor grad_loss, Tensor h, Tensor codebook, Tensor target, Tensor lse, "
        "float inv_temperature) -> (Tensor, Tensor)");

  // ---- attention (dera_fast/ops/attention.py) ----
  // Dense mode (cu_seqlens_* = None): q [B, H, Lq, D], k/v [B, H, Lk, D], contiguous, one of fp32/bf16/fp16.
  // Varlen mode: q [1, H, Tq, D], k/v [1, H, Tk, D] packed along the sequence dim; cu_seqlens_q/k int32 [S+1]
  // prefix offsets; sequence s attends only within itself. max_seqlen_* bound the per-sequence lengths.
  // Causal: key j is visible to query i iff j <= i + q_offset (dense) or j <= i + (len_k(s) - len_q(s)) (varlen).
  // Returns (out same shape/dtype as q, lse fp32 [B, H, Lq] / [1, H, Tq], natural log; rows with no visible key
  // give out = 0 and lse = -inf). Softmax scale = `scale`; accumulation in fp32.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int q_offset) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv) with the shapes and dtypes of q, k, v.
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal, int q_offset) "
        "-> (Tensor, Tensor, Tensor)");

  // ---- sacp (dera_fast/ops/sacp.py) ----
  // a, b: equal-length lists of contiguous fp32/bf16/fp16 tensors (entry i: same numel in both, None = zeros,
  // never both None); groups: id in [0, num_groups) per entry. Returns fp32 [num_groups, 3] =
  // (sum a*b, sum a*a, sum b*b) per group, deterministic (ordered reduction, no atomics).
  m.def("gradient_gram(Tensor?[] a, Tensor?[] b, int[] groups, int num_groups) -> Tensor");
  // out[i] = weights[g_i, 0] * a[i] + weights[g_i, 1] * b[i] (+ out[i] if accumulate); weights: fp32 [G, 2].
  m.def("sacp_combine_(Tensor(a!)[] out, Tensor?[] a, Tensor?[] b, int[] groups, Tensor weights, "
        "bool accumulate) -> ()");
}
