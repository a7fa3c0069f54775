// Row kernels of the CPU full-vocabulary KL (kernels.h KlDivFwdArgs / KlDivBwdArgs): the forward
// reads both rows once, chunk by chunk, through row_kernels.h's online pass (with the cross-term
// policy below); the backward reads them again and writes the gradients.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "cpu_kernels.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {
namespace {

// The cross-term policy of online_chunk() (row_kernels.h): for u's softmax against the other
// row's v, RowStats.dot holds cross = sum exp(u - max) * (u - v), which does not move with the max.
struct Cross {
  const float* u;
  const float* v;
  __attribute__((always_inline)) RowStats rebase(RowStats s, float m) const {
    const float scale = s.max == -INFINITY ? 0.0f : std::exp(s.max - m);
    return RowStats{m, s.sum * scale, s.dot * scale};
  }
  __attribute__((always_inline)) Vec operator()(int64_t i, Vec) const { return load_vec(u + i) - load_vec(v + i); }
};

}  // namespace

void kl_div_fwd_rows(const KlDivFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float x[kChunk];
  alignas(64) float y[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    // Online statistics of both softmaxes, each with its cross term against the other row.
    RowStats p = empty_stats(), q = empty_stats();
    for_each_pair_chunk(a, row, x, y, [&](int64_t, int64_t, int64_t padded) {
      online_chunk(x, padded, p, Cross{x, y});
      online_chunk(y, padded, q, Cross{y, x});
    });
    const float log_sum_p = std::log(p.sum);
    const float log_sum_q = std::log(q.sum);
    // lse_p - lse_q as (max_p - max_q) + (log s_p - log s_q): exact when the maxima are close,
    // where subtracting the two fp32 lse's would round at their own scale (~1e-3 at |lse| = 1e4).
    const float lse_diff = (p.max - q.max) + (log_sum_p - log_sum_q);
    a.kl[row] = a.direction == kKlForward ? p.dot / p.sum - lse_diff : q.dot / q.sum + lse_diff;
    a.lse[row] = p.max + log_sum_p;
    a.other_lse[row] = q.max + log_sum_q;
  }
}

void kl_div_bwd_rows(const KlDivBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float x[kChunk];
  alignas(64) float y[kChunk];
  const bool forward = a.direction == kKlForward;
  for (int64_t row = begin; row < end; ++row) {
    const Vec lse_p = splat(a.lse[row]), lse_q = splat(a.other_lse[row]), kl = splat(a.kl[row]);
    pair_gradient_row(a, row, a.grad_kl[row], x, y, [&](Vec xv, Vec yv, float g) {
      const Vec log_p = xv - lse_p, log_q = yv - lse_q;
      const Vec p = exp_nonpositive(log_p), q = exp_nonpositive(log_q);
      // The distribution averaged over carries the log-ratio term; 0 where it is 0.
      const Vec gx = forward ? (p == 0.0f ? splat(0.0f) : p * (log_p - log_q - kl)) : p - q;
      const Vec gy = forward ? q - p : (q == 0.0f ? splat(0.0f) : q * (log_q - log_p - kl));
      return std::pair{g * gx, g * gy};
    });
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
