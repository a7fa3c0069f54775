// Per-token math shared by the CPU and CUDA kernels (docs/SPEC.md sections 1-2).
// Everything here is fp32 and torch-free; each function works on one element or one row summary.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RLFUSE_HD __host__ __device__ __forceinline__
#else
// Internal linkage: the CPU kernels compile this header once per instruction set, and each
// copy must stay with the code built for it.
#define RLFUSE_HD static inline
#endif

namespace rlfuse {

// Online softmax statistics of one row of x = z / T, kept relative to the running maximum:
//   max = running maximum, sum = sum_j exp(x_j - max), dot = sum_j exp(x_j - max) * (x_j - max).
// Keeping `dot` shifted (docs/SPEC.md's t = dot + max * sum) avoids cancellation in H = lse - E[x]
// for large logits. -inf entries contribute nothing; an all -inf (or empty) row keeps
// max = -inf, sum = dot = 0. A NaN element turns max (and so every output) into NaN.
struct RowStats {
  float max;
  float sum;
  float dot;
};

RLFUSE_HD RowStats empty_stats() { return RowStats{-INFINITY, 0.0f, 0.0f}; }

// e * d with e = exp(d) and the 0 * -inf case (d = -inf) defined as 0.
RLFUSE_HD float weighted_logit(float e, float d) { return e == 0.0f ? 0.0f : e * d; }

// Re-expresses `s` relative to a larger maximum `m` (s.max must be finite or -inf, m finite).
RLFUSE_HD RowStats rebase(RowStats s, float m) {
  if (s.max == -INFINITY) return RowStats{m, 0.0f, 0.0f};
  const float shift = s.max - m;  // <= 0; -inf when the gap overflows fp32 (e.g. -3e38 vs 3e38)
  const float scale = expf(shift);
  if (scale == 0.0f) return RowStats{m, 0.0f, 0.0f};  // everything so far underflows: adds 0, not 0 * inf
  return RowStats{m, s.sum * scale, (s.dot + s.sum * shift) * scale};
}

// Adds one element.
RLFUSE_HD RowStats push(RowStats s, float x) {
  if (x != x || s.max != s.max) return RowStats{NAN, NAN, NAN};
  if (x > s.max) {
    s = rebase(s, x);
    s.sum += 1.0f;  // exp(0); its dot contribution is 0
    return s;
  }
  const float d = x - s.max;  // -inf for x = -inf
  const float e = expf(d);
  s.sum += e;
  s.dot += weighted_logit(e, d);
  return s;
}

// Merges two partial summaries (the result depends on the order only through rounding).
RLFUSE_HD RowStats merge(RowStats a, RowStats b) {
  if (a.max != a.max || b.max != b.max) return RowStats{NAN, NAN, NAN};
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const float m = a.max > b.max ? a.max : b.max;
  const RowStats ra = rebase(a, m);
  const RowStats rb = rebase(b, m);
  return RowStats{m, ra.sum + rb.sum, ra.dot + rb.dot};
}

// Final per-row outputs. `x_target` is x_y, or NaN when the token id is out of range.
struct RowResult {
  float logp;
  float entropy;
  float lse;
};

RLFUSE_HD RowResult finalize(RowStats s, float x_target) {
  const float log_sum = logf(s.sum);
  RowResult r;
  r.lse = s.max + log_sum;
  // (x_y - max) - log_sum, never x_y - lse: lse is rounded at its own scale (~1e-3 absolute at
  // |lse| = 1e4), while x_y - max is exact for every token that carries probability.
  r.logp = (x_target - s.max) - log_sum;
  r.entropy = log_sum - s.dot / s.sum;  // lse - E_p[x]
  return r;
}

// Per-row coefficients of the gradient (docs/SPEC.md section 2), in the form
//   dL/dx_j = target * 1[j = y] + p_j * (base + slope * (x_j - lse)),  with p_j = exp(x_j - lse).
// Using log p_j = x_j - lse instead of x_j keeps the bracket well conditioned for large logits.
// dL/dz_j = dL/dx_j / T, so every coefficient already carries the 1/T factor.
struct GradCoeffs {
  float target;
  float base;
  float slope;
};

RLFUSE_HD GradCoeffs grad_coeffs(float g_logp, float g_entropy, float entropy, float inv_temp) {
  // g_logp * (1[j=y] - p_j) - g_H * p_j * (log p_j + H)
  GradCoeffs c;
  c.target = g_logp * inv_temp;
  c.base = (-g_logp - g_entropy * entropy) * inv_temp;
  c.slope = -g_entropy * inv_temp;
  return c;
}

// Gradient of one element given its x_j. -inf logits get exactly 0.
RLFUSE_HD float grad_element(GradCoeffs c, float x, float lse, bool is_target) {
  const float logp = x - lse;
  const float p = expf(logp);
  const float g = p == 0.0f ? 0.0f : p * (c.base + c.slope * logp);
  return is_target ? g + c.target : g;
}

// The row's fp32(1/T): args.inv_temps[row] when a per-row temperature is given (a null pointer
// means none), else the scalar args.inv_temp. Every use of 1/T in a row (scaling, the gradient's
// 1/T factor, top-k keys) takes this value.
template <typename Args>
RLFUSE_HD float row_inv_temp(const Args& args, int64_t row) {
  return args.inv_temps != nullptr ? args.inv_temps[row] : args.inv_temp;
}

// The row's kept-set threshold on x (schema.h TokenLogprobsFwdArgs.kept_min): -inf, which filters
// nothing, when args.kept_min is null.
template <typename Args>
RLFUSE_HD float row_kept_min(const Args& args, int64_t row) {
  return args.kept_min != nullptr ? args.kept_min[row] : -INFINITY;
}

// x restricted to the kept set {x >= kept_min}: -inf below it. A NaN x stays NaN (NaN < t is
// false), so a NaN row still gives NaN.
RLFUSE_HD float kept_logit(float x, float kept_min) { return x < kept_min ? -INFINITY : x; }

// Address of row r in a [outer, inner, V] layout given by two strides (elements, 64-bit).
RLFUSE_HD int64_t row_offset(int64_t row, int64_t inner, int64_t stride_outer, int64_t stride_inner) {
  return (row / inner) * stride_outer + (row % inner) * stride_inner;
}

// Counter-based random bits for sampling, keyed by (seed, sample, vocabulary position): a row's
// draws depend only on its own seed, never on the batch it sits in. lowbias32 mixing (public
// domain integer hash); all arithmetic is uint32 with wrap-around, so every backend agrees.
RLFUSE_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// The per-(row, sample) part of the key; rng_bits(seed, sample, j) = mix32(row_key + j * golden).
RLFUSE_HD uint32_t rng_row_key(uint64_t seed, uint32_t sample) {
  uint32_t h = mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u);
  h = mix32(h ^ static_cast<uint32_t>(seed >> 32));
  return mix32(h ^ sample);
}

RLFUSE_HD uint32_t rng_bits(uint32_t row_key, uint32_t j) { return mix32(row_key + j * 0x9e3779b9u); }

// Uniform in (0, 1) from 23 random bits: (m + 0.5) * 2^-23 is exact in fp32, so u lies in
// [2^-24, 1 - 2^-24] and -log(-log u) is always finite (with 24 bits the top value rounded to 1).
RLFUSE_HD float rng_uniform(uint32_t bits) { return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-7f; }

}  // namespace rlfuse
