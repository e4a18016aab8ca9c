// Exhaustive checks of the inline index arithmetic of csrc/attention_kernels.h (host code, no emulation needed):
// is_visible / visible_keys, fwd_key_tiles over all splits, bwd_first_q_tile, seq_info / row_index in dense and
// varlen mode, choose_num_splits. Prints "<n> failures" last.
#include "attention_kernels.h"

#include <cstdio>
#include <vector>

using namespace dera_fast::attn;

static int failures = 0;
#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond) && failures++ < 20) {                            \
      std::printf("FAIL line %d (%s): ", __LINE__, #cond);       \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
    }                                                            \
  } while (0)

static Seq dense_seq(int lq, int lk, int off) {
  Params p;
  p.seqlen_q = lq;
  p.seqlen_k = lk;
  p.q_offset = off;
  return seq_info(p, 0);
}

static void check_tiles() {
  const int lens[] = {0, 1, 2, 7, 16, 17, 63, 64, 65, 113, 130};
  const int offs[] = {-70, -17, -1, 0, 1, 5, 64, 200};
  const int bms[] = {8, 16, 32, 64};
  const int bns[] = {8, 32, 64};
  const int splits[] = {1, 2, 3, 5, 16};
  for (int lq : lens) for (int lk : lens) for (int off : offs) for (int causal = 0; causal < 2; ++causal) {
    const Seq s = dense_seq(lq, lk, off);
    for (int row = 0; row < lq; ++row) {
      const int n = visible_keys(row, s, causal);
      for (int col = -1; col <= lk + 1; ++col)
        CHECK(is_visible(row, col, s, causal) == (col >= 0 && col < n), "lq=%d lk=%d off=%d row=%d col=%d", lq,
              lk, off, row, col);
    }
    for (int bm : bms) for (int bn : bns) {
      const int n_kt = static_cast<int>(cdiv(lk, bn)), n_qt = static_cast<int>(cdiv(lq, bm));
      auto any_visible = [&](int q0, int q1, int k0, int k1) {
        for (int i = q0; i < q1 && i < lq; ++i)
          for (int j = k0; j < k1 && j < lk; ++j)
            if (is_visible(i, j, s, causal)) return true;
        return false;
      };
      for (int m0 = 0; m0 < lq; m0 += bm) {
        for (int ns : splits) {
          std::vector<int> covered(n_kt + 1, 0);
          int prev_end = 0;
          for (int sp = 0; sp < ns; ++sp) {
            int b, e;
            fwd_key_tiles(m0, bm, bn, s, causal, sp, ns, &b, &e);
            CHECK(b <= e, "b=%d e=%d", b, e);
            if (b < e) {
              CHECK(b >= prev_end && e <= n_kt, "split %d/%d range [%d,%d) prev_end %d n_kt %d", sp, ns, b, e,
                    prev_end, n_kt);
              prev_end = e;
              for (int t = b; t < e && t <= n_kt; ++t) covered[t]++;
            }
          }
          for (int t = 0; t < n_kt; ++t) {
            const int needed = any_visible(m0, m0 + bm, t * bn, t * bn + bn);
            CHECK(covered[t] == needed, "lq=%d lk=%d off=%d causal=%d bm=%d bn=%d m0=%d ns=%d tile %d: %d vs %d",
                  lq, lk, off, causal, bm, bn, m0, ns, t, covered[t], needed);
          }
        }
      }
      for (int n0 = 0; n0 < lk; n0 += bn) {
        const int first = bwd_first_q_tile(n0, bm, s, causal);
        CHECK(first >= 0 && first <= n_qt, "first=%d n_qt=%d", first, n_qt);
        for (int it = 0; it < n_qt; ++it) {
          const bool has = any_visible(it * bm, it * bm + bm, n0, n0 + bn);
          CHECK(has == (it >= first), "lq=%d lk=%d off=%d causal=%d bm=%d bn=%d n0=%d it=%d first=%d", lq, lk,
                off, causal, bm, bn, n0, it, first);
        }
      }
    }
  }
}

static void check_rows() {
  // Dense [B, H, L, D]: flat row (b * H + h) * L + i.
  const int B = 3, H = 2, L = 5;
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < L; ++i)
    CHECK(row_index(int64_t(H) * L, L, b, h, 0, i) == (int64_t(b) * H + h) * L + i, "dense b=%d h=%d i=%d", b, h, i);
  // Varlen [1, H, T, D] with sequences of 3, 0, 7 and 2 queries and 4, 6, 0 and 9 keys.
  const int cu_q[] = {0, 3, 3, 10, 12}, cu_k[] = {0, 4, 10, 10, 19};
  const int S = 4, Tq = 12, Hv = 3;
  Params p;
  p.cu_seqlens_q = cu_q;
  p.cu_seqlens_k = cu_k;
  std::vector<int> hits(Hv * Tq, 0);
  for (int b = 0; b < S; ++b) {
    const Seq s = seq_info(p, b);
    CHECK(s.q_start == cu_q[b] && s.len_q == cu_q[b + 1] - cu_q[b], "varlen q seq %d", b);
    CHECK(s.k_start == cu_k[b] && s.len_k == cu_k[b + 1] - cu_k[b], "varlen k seq %d", b);
    CHECK(s.causal_offset == s.len_k - s.len_q, "varlen causal offset seq %d", b);
    for (int h = 0; h < Hv; ++h) for (int i = 0; i < s.len_q; ++i) {
      const int64_t r = row_index(0, Tq, b, h, s.q_start, i);
      CHECK(r >= 0 && r < Hv * Tq, "row %lld", static_cast<long long>(r));
      if (r >= 0 && r < Hv * Tq) hits[r]++;
    }
  }
  for (int r = 0; r < Hv * Tq; ++r) CHECK(hits[r] == 1, "varlen row %d hit %d times", r, hits[r]);
  const Seq d = dense_seq(9, 11, -3);
  CHECK(d.q_start == 0 && d.k_start == 0 && d.len_q == 9 && d.len_k == 11 && d.causal_offset == -3, "dense seq");
}

static void check_splits() {
  const int sms_list[] = {1, 108, 132};
  const int64_t kts[] = {0, 1, 2, 5, 40, 1000};
  for (int sms : sms_list) for (int64_t kt : kts) for (int64_t ctas = 1; ctas <= 300; ++ctas) {
    const int n = choose_num_splits(ctas, sms, kt);
    CHECK(n >= 1 && n <= kMaxSplits, "n=%d", n);
    if (ctas >= sms || kt <= 1) CHECK(n == 1, "ctas=%lld sms=%d kt=%lld n=%d", (long long)ctas, sms, (long long)kt, n);
    CHECK(n == 1 || (ctas * n <= sms && n <= kt), "ctas=%lld sms=%d kt=%lld n=%d", (long long)ctas, sms,
          (long long)kt, n);
  }
  CHECK(fwd_num_splits(Dtype::kBFloat16, 1, 1, 128, 4096, 132) > 1, "a small grid with a long Lk should split");
  CHECK(fwd_num_splits(Dtype::kBFloat16, 8, 12, 2048, 2048, 132) == 1, "a full grid should not split");
}

int main() {
  check_tiles();
  check_rows();
  check_splits();
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
