// One-row building blocks of the CPU kernels (SPEC.md sections 1-2), compiled once per
// instruction set with the *_rows.cpp files that include them: the statistics pass and the
// gradient pass. The vocabulary is walked in L1-sized chunks converted to fp32 and processed
// kLanes at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "rlfuse/kernels.h"
#include "rlfuse/row_math.h"
#include "vec_math.h"

namespace rlfuse::cpu {

RLFUSE_ALWAYS_INLINE const char* row_pointer(const void* base, DType dtype, const RowLayout& layout, int64_t row) {
  const int64_t offset = row_offset(row, layout.inner, layout.stride_outer, layout.stride_inner);
  return static_cast<const char*>(base) + offset * element_size(dtype);
}

// Pads x[n, round_up(n, kLanes)) with -inf, which contributes nothing to any row statistic.
RLFUSE_ALWAYS_INLINE int64_t pad_to_lanes(float* x, int64_t n) {
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = n; i < padded; ++i) x[i] = -INFINITY;
  return padded;
}

// Max of x[0, n) (n a multiple of kLanes) with NaN winning, so a NaN row yields NaN outputs.
RLFUSE_ALWAYS_INLINE float chunk_max(const float* x, int64_t n) {
  Vec m = splat(-INFINITY);
  for (int64_t i = 0; i < n; i += kLanes) {
    const Vec v = load_vec(x + i);
    m = (v > m) | (v != v) ? v : m;
  }
  float result = m[0];
  for (int l = 1; l < kLanes; ++l) result = (m[l] > result || m[l] != m[l]) ? m[l] : result;
  return result;
}

// Adds sum exp(x - max) and sum exp(x - max) * (x - max) over x[0, n) to `stats`.
RLFUSE_ALWAYS_INLINE void accumulate_chunk(const float* x, int64_t n, RowStats& stats) {
  const Vec m = splat(stats.max);
  Vec sum = splat(0.0f), dot = splat(0.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const Vec d = load_vec(x + i) - m;
    const Vec e = exp_nonpositive(d);
    sum += e;
    dot += e == 0.0f ? splat(0.0f) : e * d;  // 0 * -inf is 0 here
  }
  stats.sum += lane_sum(sum);
  stats.dot += lane_sum(dot);
}

// Statistics pass over one row of x = z * inv_temp: logp of token y (NaN if y is out of
// range), entropy and lse. `buf` holds kChunk floats.
RLFUSE_ALWAYS_INLINE RowResult row_statistics(const char* src, DType dtype, int64_t vocab, float inv_temp,
                                              int64_t y, float* buf) {
  const int64_t esize = element_size(dtype);
  RowStats stats = empty_stats();
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    load_scaled(src + start * esize, dtype, n, inv_temp, buf);
    const int64_t padded = pad_to_lanes(buf, n);
    const float m = chunk_max(buf, padded);
    if (m != m) {
      stats = RowStats{NAN, NAN, NAN};
      break;
    }
    if (m > stats.max) stats = rebase(stats, m);
    if (stats.max != -INFINITY) accumulate_chunk(buf, padded, stats);
  }
  float x_target = NAN;
  if (y >= 0 && y < vocab) load_scaled(src + y * esize, dtype, 1, inv_temp, &x_target);
  return finalize(stats, x_target);
}

// Gradient pass over one row (SPEC.md section 2) for upstream gradients g_logp (on logp) and
// g_entropy (on H): dst may alias src, each chunk is read before it is written. A row with
// g_logp = g_entropy = 0 (a masked or fully clipped token) is written as zeros without reading the
// logits, so NaN/inf in a masked row never reaches its gradient (kernels.h contract). `buf` holds
// kChunk floats.
RLFUSE_ALWAYS_INLINE void row_gradient(const char* src, char* dst, DType dtype, int64_t vocab, float inv_temp,
                                       float g_logp, float g_entropy, float entropy, float lse, int64_t y,
                                       float* buf) {
  const int64_t esize = element_size(dtype);
  if (g_logp == 0.0f && g_entropy == 0.0f) {
    std::memset(dst, 0, vocab * esize);
    return;
  }
  const GradCoeffs c = grad_coeffs(g_logp, g_entropy, entropy, inv_temp);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    load_scaled(src + start * esize, dtype, n, inv_temp, buf);
    const int64_t padded = pad_to_lanes(buf, n);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const Vec logp = load_vec(buf + i) - lse;
      const Vec p = exp_nonpositive(logp);
      store_vec(buf + i, p == 0.0f ? splat(0.0f) : p * (c.base + c.slope * logp));
    }
    if (y >= start && y < start + n) buf[y - start] += c.target;
    store_converted(buf, n, dtype, dst + start * esize);
  }
}

}  // namespace rlfuse::cpu
