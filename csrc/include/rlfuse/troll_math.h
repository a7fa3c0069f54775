// TROLL on the sparse support (docs/SPEC.md section 7, steps 2-5), float64, shared by the CPU and
// CUDA kernels (the Triton kernel ports it line by line; python/rlfuse/troll.py is the reference).
//
// One row's support is n entries in any fixed order. In: a[j] = x_j (the scaled logit, -inf allowed:
// such an entry is "dead", it carries no probability under a or q and gets no gradient), b[j] = the
// raw old log-prob (stored value, old_logprobs for y, or kTrollLogFloor), ty = the index of the chosen
// token (-1: none, the loss is NaN). Out: a = log_softmax(x) over S, b = log_softmax(b_raw) over S,
// lq = log q, g = dL/dx_j of the unweighted TROLL loss L (the caller multiplies by the policy weight
// and by 1/T); the loss, eta, KL(a || b), KL(q || b) and the number of Newton steps taken.
#pragma once

#include <cmath>

#include "rlfuse/row_math.h"

namespace rlfuse {

constexpr double kTrollLogFloor = -27.631021115928547;  // log(1e-12): old log-prob of ids the old policy did not keep
constexpr int kTrollNewtonSteps = 32;  // fixed maximum; rows stop once converged (troll.py NEWTON_STEPS)
constexpr double kTrollTolerance = 1e-10;     // |KL - eps| <= max(1e-10 eps, 1e-13)
constexpr double kTrollAbsTolerance = 1e-13;

struct TrollSupportResult {
  double loss;
  double eta;
  double kl_before;
  double kl_after;
  int steps;
};

RLFUSE_HD bool troll_live(double v) { return v > -INFINITY || v != v; }  // NaN stays in (and spreads)

// log_softmax of v[0, n) in place over the entries `live` selects (others -> -inf).
template <typename Live>
RLFUSE_HD void troll_log_softmax(int n, double* v, Live live) {
  double m = -INFINITY;
  for (int j = 0; j < n; ++j) {
    if (live(j) && (v[j] > m || v[j] != v[j])) m = v[j];
  }
  double total = 0.0;
  for (int j = 0; j < n; ++j) {
    if (live(j)) total += exp(v[j] - m);
  }
  const double lse = m + log(total);
  for (int j = 0; j < n; ++j) v[j] = live(j) ? v[j] - lse : -INFINITY;
}

// ea: scratch of n doubles (e^(a_j) once a is normalised; 0 for dead entries). Exponentials are
// computed once and reused: e^(a_j) (KL(a || b), the trust term, the gradient), the first Newton
// step at s = 1 (where q = a: its residual is KL(a || b) - eps, its mean KL(a || b)), and q from the
// last Newton evaluation when it was at the final s (the usual exit: a converged row stops moving).
RLFUSE_HD TrollSupportResult troll_on_support(int n, double* a, double* b, double* lq, double* g, double* ea, int ty,
                                              double adv, double eps, double alpha) {
  TrollSupportResult r{NAN, 0.0, NAN, NAN, 0};
  // The new policy renormalised on its live entries (e^(a_j) kept); the old over the whole support.
  {
    double m = -INFINITY;
    for (int j = 0; j < n; ++j) {
      if (troll_live(a[j]) && (a[j] > m || a[j] != a[j])) m = a[j];
    }
    double total = 0.0;
    for (int j = 0; j < n; ++j) {
      const double e = troll_live(a[j]) ? exp(a[j] - m) : 0.0;
      ea[j] = e;
      total += e;
    }
    const double lse = m + log(total), inv_total = 1.0 / total;
    for (int j = 0; j < n; ++j) {
      const bool live = troll_live(a[j]);
      a[j] = live ? a[j] - lse : -INFINITY;
      ea[j] *= inv_total;
    }
  }
  troll_log_softmax(n, b, [](int) { return true; });
  double kl_before = 0.0;
  for (int j = 0; j < n; ++j) {
    if (troll_live(a[j])) kl_before += ea[j] * (a[j] - b[j]);
  }
  r.kl_before = kl_before;
  // Safeguarded Newton in s = 1 / (1 + eta) (troll.py solve_eta): KL(s) = s E_q[d] - log E_b[e^(s d)],
  // d = a - b, rises from ~0 at s = 0 to KL(a || b) at s = 1 with slope s Var_q(d).
  const double tolerance = fmax(kTrollTolerance * eps, kTrollAbsTolerance);
  double s_low = 0.0, s_high = 1.0, s = 1.0;
  bool active = false;
  double s_cached = -1.0, top_cached = 0.0, total_cached = 1.0;  // lq[j] = e^(w_j - top) at s_cached
  for (int step = 0; step < kTrollNewtonSteps; ++step) {
    double mean, variance, residual;
    if (step == 0) {  // s = 1 is q = a: mean E_a[d] = KL(a || b), residual KL(a || b) - eps
      mean = kl_before;
      variance = 0.0;
      for (int j = 0; j < n; ++j) {
        if (!troll_live(a[j])) continue;
        const double c = (a[j] - b[j]) - mean;
        variance += ea[j] * c * c;
      }
      residual = kl_before - eps;
    } else {
      double top = -INFINITY;
      for (int j = 0; j < n; ++j) {
        if (!troll_live(a[j])) continue;
        const double w = b[j] + s * (a[j] - b[j]);
        if (w > top || w != w) top = w;
      }
      double total = 0.0;
      mean = 0.0;
      for (int j = 0; j < n; ++j) {
        if (!troll_live(a[j])) continue;
        const double e = exp(b[j] + s * (a[j] - b[j]) - top);
        lq[j] = e;
        total += e;
        mean += e * (a[j] - b[j]);
      }
      mean /= total;
      variance = 0.0;
      for (int j = 0; j < n; ++j) {
        if (!troll_live(a[j])) continue;
        const double c = (a[j] - b[j]) - mean;
        variance += lq[j] * c * c;
      }
      variance /= total;
      residual = s * mean - (top + log(total)) - eps;  // KL(q_s || b) - eps
      s_cached = s;
      top_cached = top;
      total_cached = total;
    }
    r.steps = step + 1;
    if (step == 0) {
      active = residual > 0.0;
      if (!active) break;
    }
    if (residual <= 0.0) {
      s_low = s;
    } else {
      s_high = s;
    }
    if (!(fabs(residual) > tolerance)) break;  // converged: the row stops moving
    const double newton = s - residual / fmax(s * variance, 1e-300);
    s = (newton >= s_low && newton <= s_high) ? newton : 0.5 * (s_low + s_high);
  }
  const double eta = active ? 1.0 / s - 1.0 : 0.0;
  r.eta = eta;
  // log q = log_softmax(b + s d) on the live entries (q = a when not projected); q goes in g for now.
  if (!active) {
    for (int j = 0; j < n; ++j) {
      lq[j] = a[j];
      g[j] = ea[j];
    }
  } else if (s == s_cached) {
    const double shift = top_cached + log(total_cached), inv_total = 1.0 / total_cached;
    for (int j = 0; j < n; ++j) {
      const bool live = troll_live(a[j]);
      g[j] = live ? lq[j] * inv_total : 0.0;
      lq[j] = live ? b[j] + s * (a[j] - b[j]) - shift : -INFINITY;
    }
  } else {
    for (int j = 0; j < n; ++j) lq[j] = troll_live(a[j]) ? b[j] + s * (a[j] - b[j]) : -INFINITY;
    troll_log_softmax(n, lq, [&](int j) { return troll_live(a[j]); });
    for (int j = 0; j < n; ++j) g[j] = troll_live(a[j]) ? exp(lq[j]) : 0.0;
  }
  double kl_after = 0.0, trust = 0.0, dbar = 0.0;
  for (int j = 0; j < n; ++j) {
    if (!troll_live(a[j])) continue;
    const double q = g[j];
    kl_after += q * (lq[j] - b[j]);
    trust += ea[j] * (a[j] - lq[j]);
    dbar += q * (a[j] - b[j]);
  }
  r.kl_after = kl_after;
  const double ratio = ty >= 0 ? exp(lq[ty] - b[ty]) : NAN;  // exp(log q_y - b_y); 0 for a dead y
  r.loss = -adv * ratio + alpha * trust;
  // dL/da_j: the policy term through the projection (upstream gy on log q_y; SPEC step 5) plus
  // alpha d KL(a || sg(q)) / da_j = alpha e^(a_j) (a_j - log q_j) (its "+ e^(a_j)" part is removed by
  // the log-softmax below); then dL/dx_j = G_j - e^(a_j) sum_i G_i.
  const double gy = -adv * ratio;
  double variance = 0.0;
  for (int j = 0; j < n; ++j) {
    if (!troll_live(a[j])) continue;
    const double c = (a[j] - b[j]) - dbar;
    variance += g[j] * c * c;
  }
  const double inv = 1.0 / (1.0 + eta);
  const bool implicit = eta > 0.0 && variance > 0.0 && gy != 0.0;
  const double h = implicit ? gy * ((a[ty] - b[ty]) - dbar) / variance : 0.0;
  double total = 0.0;
  for (int j = 0; j < n; ++j) {
    if (!troll_live(a[j])) {
      g[j] = 0.0;
      continue;
    }
    const double q = g[j];
    const double target = j == ty ? gy : 0.0;
    double gj = (target - q * gy - (implicit ? q * ((a[j] - b[j]) - dbar) * h : 0.0)) * inv;
    gj += alpha * ea[j] * (a[j] - lq[j]);
    g[j] = gj;
    total += gj;
  }
  for (int j = 0; j < n; ++j) {
    if (troll_live(a[j])) g[j] -= ea[j] * total;
  }
  return r;
}

}  // namespace rlfuse
