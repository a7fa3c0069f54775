// Row kernels of the CPU generalised Jensen-Shannon divergence (schema.h JsdFwdArgs / JsdBwdArgs,
// docs/distillation.md). p = softmax(x) (logits), q = softmax(y) (other), m = (1 - beta) p + beta q.
// Forward: two reads of both rows, chunk by chunk: row_kernels.h's online statistics of each row,
// then the mixture sums. Backward: one more read of both rows and the requested gradients.
//
// Per element, with d = log q - log p:
//   w = (1 - beta) + beta e^d  (d <= 0)   or   beta + (1 - beta) e^-d  (d > 0),   r = log w,
//   u = log(m / p) = r (d <= 0) or r + d,   v = log(m / q) = r - d (d <= 0) or r,
// so the exponential only sees -|d| <= 0 and the logarithm a value in [min(beta, 1 - beta), 1]:
// no overflow for any d, and identical rows (d = 0, w = 1 exactly) give exactly 0.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "cpu_kernels.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {
namespace {

// u and v of one lane group.
struct MixtureLogs {
  Vec u;
  Vec v;
};

RLFUSE_ALWAYS_INLINE MixtureLogs mixture_logs(Vec log_p, Vec log_q, float beta) {
  const Vec d = log_q - log_p;
  const auto below = d <= 0.0f;
  const Vec abs_d = below ? -d : d;
  const Vec e = exp_nonpositive(-abs_d);  // NaN d (both entries -inf): garbage, selected away
  const Vec w = below ? (1.0f - beta) + beta * e : beta + (1.0f - beta) * e;
  const Vec r = log_positive(w);
  return MixtureLogs{below ? r : r + d, below ? r - d : r};
}

}  // namespace

void jsd_fwd_rows(const JsdFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float x[kChunk];
  alignas(64) float y[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    // Read 1: both rows' statistics, through the same code (identical rows, identical results).
    RowStats p = empty_stats(), q = empty_stats();
    for_each_pair_chunk(a, row, x, y, [&](int64_t, int64_t, int64_t padded) {
      online_chunk(x, padded, p);
      online_chunk(y, padded, q);
    });
    const float log_sum_p = std::log(p.sum), log_sum_q = std::log(q.sum);
    // Read 2: the mixture sums. log p = (x - max) - log sum: exact for the probable entries.
    const Vec max_p = splat(p.max), max_q = splat(q.max);
    Vec sum_pu = splat(0.0f), sum_qv = splat(0.0f);
    for_each_pair_chunk(a, row, x, y, [&](int64_t, int64_t, int64_t padded) {
      for (int64_t i = 0; i < padded; i += kLanes) {
        const Vec log_p = (load_vec(x + i) - max_p) - log_sum_p;
        const Vec log_q = (load_vec(y + i) - max_q) - log_sum_q;
        const Vec pv = exp_nonpositive(log_p), qv = exp_nonpositive(log_q);
        const MixtureLogs m = mixture_logs(log_p, log_q, a.beta);
        sum_pu += pv == 0.0f ? splat(0.0f) : pv * m.u;
        sum_qv += qv == 0.0f ? splat(0.0f) : qv * m.v;
      }
    });
    const float kl_p = -lane_sum(sum_pu), kl_q = -lane_sum(sum_qv);
    a.kl_logits[row] = kl_p;
    a.kl_other[row] = kl_q;
    a.jsd[row] = a.beta * kl_q + (1.0f - a.beta) * kl_p;
    a.lse[row] = p.max + log_sum_p;
    a.other_lse[row] = q.max + log_sum_q;
  }
}

void jsd_bwd_rows(const JsdBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float x[kChunk];
  alignas(64) float y[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const Vec lse_p = splat(a.lse[row]), lse_q = splat(a.other_lse[row]);
    const Vec kl_p = splat(a.kl_logits[row]), kl_q = splat(a.kl_other[row]);
    pair_gradient_row(a, row, a.grad_jsd[row], x, y, [&](Vec xv, Vec yv, float g) {
      const float coef_x = -(1.0f - a.beta) * g, coef_y = -a.beta * g;
      const Vec log_p = xv - lse_p, log_q = yv - lse_q;
      const Vec pv = exp_nonpositive(log_p), qv = exp_nonpositive(log_q);
      const MixtureLogs m = mixture_logs(log_p, log_q, a.beta);
      return std::pair{pv == 0.0f ? splat(0.0f) : coef_x * (pv * (m.u + kl_p)),
                       qv == 0.0f ? splat(0.0f) : coef_y * (qv * (m.v + kl_q))};
    });
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
