// The attention kernels and launchers of csrc/attention_kernels*.cu, run on the CPU: this folder comes first on the
// include path, so the kernels get the CPU versions of <attention_ptx.cuh> and <attention_launch.cuh>. Compared
// with a float64 reference (out, lse, dq, dk, dv) on fp16, bf16 and fp32, every head dim, dense, varlen (with an
// empty sequence), causal offsets of both signs (fully masked rows), split-KV. Prints "<n> failures" last.
#include "emu_runtime.h"
// the kernels (quote includes: found in csrc/ through the include path)
#include "attention_kernels.cu"
#include "attention_kernels_bwd.cu"

#include <random>

using namespace dera_fast::attn;

static int failures = 0;

template <typename T> static float tf(T x) { return dera_fast::attn::to_f(x); }

template <Dtype DT, int D>
static void run_case(const char* name, int B, int H, const std::vector<int>& lqs, const std::vector<int>& lks,
                     bool varlen, bool causal, int q_offset, int splits, double tol) {
  using T = typename dera_fast::attn::Elem<DT>::T;
  const int S = varlen ? static_cast<int>(lqs.size()) : B, NB = varlen ? 1 : B;
  std::vector<int> cu_q(1, 0), cu_k(1, 0);
  for (int s = 0; s < (varlen ? S : 0); ++s) cu_q.push_back(cu_q.back() + lqs[s]), cu_k.push_back(cu_k.back() + lks[s]);
  const int Lq = varlen ? cu_q.back() : lqs[0], Lk = varlen ? cu_k.back() : lks[0];
  const size_t nq = size_t(NB) * H * Lq * D, nk = size_t(NB) * H * Lk * D, nr = size_t(NB) * H * Lq;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd;
  auto fill = [&](std::vector<T>& x, size_t n) { x.resize(n); for (auto& e : x) e = from_f<T>(nd(rng)); };
  std::vector<T> q, k, v, dout, out(nq), dq(nq), dk(nk), dv(nk);
  fill(q, nq); fill(k, nk); fill(v, nk); fill(dout, nq);
  std::vector<float> lse(nr), delta(nr), o_part(size_t(splits) * nq), lse_part(size_t(splits) * nr);
  Params p;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = out.data(); p.lse = lse.data();
  p.dout = dout.data(); p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data(); p.delta = delta.data();
  p.heads = H; p.scale = 1.f / std::sqrt(float(D)); p.causal = causal; p.q_offset = q_offset;
  if (varlen) {
    p.cu_seqlens_q = cu_q.data(); p.cu_seqlens_k = cu_k.data(); p.batch = S;
    p.seqlen_q = *std::max_element(lqs.begin(), lqs.end()); p.seqlen_k = *std::max_element(lks.begin(), lks.end());
    p.q_batch_rows = 0; p.k_batch_rows = 0;
  } else {
    p.batch = B; p.seqlen_q = Lq; p.seqlen_k = Lk; p.q_batch_rows = int64_t(H) * Lq; p.k_batch_rows = int64_t(H) * Lk;
  }
  p.q_head_rows = Lq; p.k_head_rows = Lk; p.total_q_rows = nr;
  p.num_splits = splits; p.o_partial = o_part.data(); p.lse_partial = lse_part.data();
  if (attention_fwd_launch<DT, D>(p, nullptr) != cudaSuccess ||
      attention_bwd_launch<DT, D>(p, nullptr) != cudaSuccess) {
    std::printf("%s: launch failed\n", name); ++failures; return;
  }
  // Reference in double from the same (rounded) inputs.
  double e_out = 0, e_lse = 0, e_dq = 0, e_dk = 0, e_dv = 0, m_out = 0, m_dq = 0, m_dk = 0, m_dv = 0;
  int lse_inf_mismatch = 0;
  std::vector<double> gk(nk, 0.0), gv(nk, 0.0);
  for (int b = 0; b < S; ++b) for (int h = 0; h < H; ++h) {
    const int lq = varlen ? lqs[b] : Lq, lk = varlen ? lks[b] : Lk;
    const int64_t off = varlen ? lk - lq : q_offset;
    const size_t q0 = varlen ? size_t(h) * Lq + cu_q[b] : (size_t(b) * H + h) * Lq;
    const size_t k0 = varlen ? size_t(h) * Lk + cu_k[b] : (size_t(b) * H + h) * Lk;
    for (int i = 0; i < lq; ++i) {
      std::vector<double> sc(lk), pr(lk, 0.0);
      double mx = -INFINITY;
      for (int j = 0; j < lk; ++j) {
        double x = 0;
        for (int d = 0; d < D; ++d) x += double(tf(q[(q0 + i) * D + d])) * tf(k[(k0 + j) * D + d]);
        sc[j] = x * p.scale;
        if (!causal || j <= i + off) mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (int j = 0; j < lk; ++j) if (!causal || j <= i + off) sum += (pr[j] = std::exp(sc[j] - mx));
      const double ref_lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
      const float got_lse = lse[q0 + i];
      if (std::isinf(ref_lse) || std::isinf(got_lse))
        lse_inf_mismatch += !(std::isinf(ref_lse) && got_lse == -INFINITY);
      else
        e_lse = std::max(e_lse, std::fabs(got_lse - ref_lse));
      std::vector<double> o(D, 0.0), dpv(lk, 0.0);
      for (int j = 0; j < lk; ++j) {
        if (sum == 0) break;
        pr[j] /= sum;
        for (int d = 0; d < D; ++d) o[d] += pr[j] * tf(v[(k0 + j) * D + d]);
      }
      double dl = 0;
      for (int d = 0; d < D; ++d) {
        dl += double(tf(dout[(q0 + i) * D + d])) * o[d];
        m_out = std::max(m_out, std::fabs(o[d]));
        e_out = std::max(e_out, std::fabs(tf(out[(q0 + i) * D + d]) - o[d]));
      }
      std::vector<double> gq(D, 0.0);
      for (int j = 0; j < lk; ++j) {
        if (pr[j] == 0) continue;
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += double(tf(dout[(q0 + i) * D + d])) * tf(v[(k0 + j) * D + d]);
        const double ds = pr[j] * (dp - dl);
        for (int d = 0; d < D; ++d) {
          gq[d] += p.scale * ds * tf(k[(k0 + j) * D + d]);
          gk[(k0 + j) * D + d] += p.scale * ds * tf(q[(q0 + i) * D + d]);
          gv[(k0 + j) * D + d] += pr[j] * tf(dout[(q0 + i) * D + d]);
        }
      }
      for (int d = 0; d < D; ++d) {
        m_dq = std::max(m_dq, std::fabs(gq[d]));
        e_dq = std::max(e_dq, std::fabs(tf(dq[(q0 + i) * D + d]) - gq[d]));
      }
    }
    for (int j = 0; j < lk; ++j) for (int d = 0; d < D; ++d) {
      const size_t ix = (k0 + j) * D + d;
      m_dk = std::max(m_dk, std::fabs(gk[ix])); m_dv = std::max(m_dv, std::fabs(gv[ix]));
      e_dk = std::max(e_dk, std::fabs(tf(dk[ix]) - gk[ix])); e_dv = std::max(e_dv, std::fabs(tf(dv[ix]) - gv[ix]));
    }
  }
  const bool ok = lse_inf_mismatch == 0 && e_lse <= tol && e_out <= tol * std::max(1.0, m_out) &&
                  e_dq <= tol * std::max(1.0, m_dq) && e_dk <= tol * std::max(1.0, m_dk) &&
                  e_dv <= tol * std::max(1.0, m_dv) && !std::isnan(e_out + e_dq + e_dk + e_dv + e_lse);
  std::printf("%-34s %s  err out %.2e lse %.2e dq %.2e dk %.2e dv %.2e (max |ref| %.1f %.1f %.1f %.1f)%s\n", name,
              ok ? "ok  " : "FAIL", e_out, e_lse, e_dq, e_dk, e_dv, m_out, m_dq, m_dk, m_dv,
              lse_inf_mismatch ? " lse -inf mismatch" : "");
  failures += !ok;
}

// NaN propagation (issue 14): a NaN in one query row makes that row's out and lse NaN, every other row stays
// finite, with and without split-KV (whose combine must not mistake a NaN row for an empty one).
template <Dtype DT, int D>
static void run_nan_case(const char* name, int splits) {
  using T = typename dera_fast::attn::Elem<DT>::T;
  const int H = 1, Lq = 20, Lk = 150, bad = 5;
  const size_t nq = size_t(H) * Lq * D, nk = size_t(H) * Lk * D, nr = size_t(H) * Lq;
  std::mt19937 rng(99);
  std::normal_distribution<float> nd;
  auto fill = [&](std::vector<T>& x, size_t n) { x.resize(n); for (auto& e : x) e = from_f<T>(nd(rng)); };
  std::vector<T> q, k, v, dout, out(nq), dq(nq), dk(nk), dv(nk);
  fill(q, nq); fill(k, nk); fill(v, nk); fill(dout, nq);
  q[size_t(bad) * D + 3] = from_f<T>(NAN);
  std::vector<float> lse(nr), delta(nr), o_part(size_t(splits) * nq), lse_part(size_t(splits) * nr);
  Params p;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = out.data(); p.lse = lse.data();
  p.dout = dout.data(); p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data(); p.delta = delta.data();
  p.heads = H; p.scale = 1.f / std::sqrt(float(D)); p.causal = false; p.q_offset = 0;
  p.batch = 1; p.seqlen_q = Lq; p.seqlen_k = Lk; p.q_batch_rows = int64_t(H) * Lq; p.k_batch_rows = int64_t(H) * Lk;
  p.q_head_rows = Lq; p.k_head_rows = Lk; p.total_q_rows = nr;
  p.num_splits = splits; p.o_partial = o_part.data(); p.lse_partial = lse_part.data();
  if (attention_fwd_launch<DT, D>(p, nullptr) != cudaSuccess) {
    std::printf("%s: launch failed\n", name); ++failures; return;
  }
  bool ok = std::isnan(lse[bad]);
  for (int i = 0; i < Lq; ++i) {
    int nans = 0;
    for (int d = 0; d < D; ++d) nans += std::isnan(tf(out[size_t(i) * D + d]));
    ok = ok && (i == bad ? nans == D : nans == 0 && std::isfinite(lse[i]));
  }
  std::printf("%-34s %s  NaN query row -> NaN out and lse, other rows finite\n", name, ok ? "ok  " : "FAIL");
  failures += !ok;
}

int main() {
  run_case<Dtype::kFloat16, 64>("fp16 d64 200x300", 1, 2, {200}, {300}, false, false, 0, 1, 2e-2);
  run_case<Dtype::kBFloat16, 32>("bf16 d32 causal 33x47 split3", 2, 1, {33}, {47}, false, true, 14, 3, 6e-2);
  run_case<Dtype::kFloat16, 96>("fp16 d96 causal off-5 20x150 split3", 1, 1, {20}, {150}, false, true, -5, 3, 2e-2);
  run_case<Dtype::kBFloat16, 128>("bf16 d128 varlen causal", 1, 1, {17, 0, 50}, {30, 5, 100}, true, true, 0, 1, 6e-2);
  run_case<Dtype::kFloat16, 32>("fp16 d32 causal 1x1", 1, 1, {1}, {1}, false, true, 0, 1, 2e-2);
  run_case<Dtype::kFloat32, 32>("fp32 d32 causal 40x37 split2", 1, 2, {40}, {37}, false, true, 0, 2, 2e-4);
  run_case<Dtype::kFloat32, 96>("fp32 d96 varlen", 1, 1, {9, 33}, {70, 5}, true, false, 0, 1, 2e-4);
  run_nan_case<Dtype::kFloat16, 64>("fp16 d64 NaN row", 1);
  run_nan_case<Dtype::kBFloat16, 64>("bf16 d64 NaN row split3", 3);
  run_nan_case<Dtype::kFloat32, 32>("fp32 d32 NaN row", 1);
  run_nan_case<Dtype::kFloat32, 32>("fp32 d32 NaN row split2", 2);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
