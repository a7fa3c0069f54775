// One-row building blocks of the CPU kernels (docs/SPEC.md sections 1-2), compiled once per
// instruction set with the *_rows.cpp files that include them: the statistics pass (online_chunk,
// the one statistics primitive of every op: token log-probs, policy loss, top-k, sampling and,
// with its cross-term policy, KL) and the gradient pass. The vocabulary is walked in L1-sized
// chunks converted to fp32 and processed kLanes at a time.
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

// Loads elements [start, start + n) of one row as x = z * inv_temp into `buf`, padded with -inf
// to whole lanes; returns the padded length. Entries below `kept_min` (a sampler's kept set,
// row_math.h kept_logit) become -inf; the default -inf keeps everything and costs one branch per chunk.
RLFUSE_ALWAYS_INLINE int64_t load_chunk(const char* src, DType dtype, int64_t start, int64_t n, float inv_temp,
                                        float* buf, float kept_min = -INFINITY) {
  load_scaled(src + start * element_size(dtype), dtype, n, inv_temp, buf);
  if (kept_min > -INFINITY) {
    for (int64_t i = 0; i < n; ++i) buf[i] = kept_logit(buf[i], kept_min);
  }
  return pad_to_lanes(buf, n);
}

// x_y = z_y * inv_temp, or NaN when y is outside [0, vocab) (never used as an index then).
RLFUSE_ALWAYS_INLINE float target_logit(const char* src, DType dtype, int64_t vocab, float inv_temp, int64_t y) {
  float x = NAN;
  if (y >= 0 && y < vocab) load_scaled(src + y * element_size(dtype), dtype, 1, inv_temp, &x);
  return x;
}

// ---- the statistics pass: one primitive for every op ------------------------------------------

// What a RowStats' `dot` sums besides the softmax mass, as a policy of online_chunk():
//   Centred (token log-probs, policy loss, top-k, sampling): w = x - max, docs/SPEC.md section 1's
//   dot, which moves with the max (row_math.h rebase());
//   KL's cross term w = u - v (kl_div_rows.cpp), which does not.
// A policy gives rebase(stats, m) for a larger max m and the weights w(i, d) of lanes [i, i + kLanes)
// of the chunk, d = x - max.
struct Centred {
  __attribute__((always_inline)) RowStats rebase(RowStats s, float m) const { return rlfuse::rebase(s, m); }
  __attribute__((always_inline)) Vec operator()(int64_t, Vec d) const { return d; }
};

// The online pass over one chunk x[0, n) (n a multiple of kLanes, padding -inf), docs/SPEC.md section 1:
// raises stats.max to the chunk's max (re-expressing what is there), then adds sum exp(x - max) to
// stats.sum and sum exp(x - max) * w to stats.dot, a term whose exponential is 0 adding 0 (0 * inf
// := 0). A NaN anywhere makes the stats NaN; while everything is -inf they stay empty.
template <typename Weight = Centred>
RLFUSE_ALWAYS_INLINE void online_chunk(const float* x, int64_t n, RowStats& stats, Weight weight = {}) {
  const float m = chunk_max(x, n);
  if (m != m || stats.max != stats.max) {
    stats = RowStats{NAN, NAN, NAN};
    return;
  }
  if (m > stats.max) stats = weight.rebase(stats, m);
  if (stats.max == -INFINITY) return;
  const Vec mv = splat(stats.max);
  Vec sum = splat(0.0f), dot = splat(0.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const Vec d = load_vec(x + i) - mv;
    const Vec e = exp_nonpositive(d);
    sum += e;
    dot += e == 0.0f ? splat(0.0f) : e * weight(i, d);
  }
  stats.sum += lane_sum(sum);
  stats.dot += lane_sum(dot);
}

struct NoChunkVisit {
  void operator()(const float*, int64_t, int64_t) const {}
};

// Statistics pass over one row of x = z * inv_temp: logp of token y (NaN if y is out of
// range), entropy and lse. `buf` holds kChunk floats. Each chunk is also handed, while it is in
// L1, to visit(x, start, n) (x[0, n) are the row's elements [start, start + n)), so an op that
// needs another look at every element (top-k) does not read the row again. With a finite
// `kept_min` the row is restricted to its kept set {x >= kept_min} (schema.h TokenLogprobsFwdArgs):
// lse and entropy over that set, logp -inf for a token outside it.
template <typename Visit = NoChunkVisit>
RLFUSE_ALWAYS_INLINE RowResult row_statistics(const char* src, DType dtype, int64_t vocab, float inv_temp,
                                              int64_t y, float* buf, Visit visit = {},
                                              float kept_min = -INFINITY) {
  RowStats stats = empty_stats();
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    online_chunk(buf, load_chunk(src, dtype, start, n, inv_temp, buf, kept_min), stats);
    visit(static_cast<const float*>(buf), start, n);
  }
  return finalize(stats, kept_logit(target_logit(src, dtype, vocab, inv_temp, y), kept_min));
}

// Gradient pass over one row (docs/SPEC.md section 2) for upstream gradients g_logp (on logp) and
// g_entropy (on H): dst may alias src, each chunk is read before it is written. A row with
// g_logp = g_entropy = 0 (a masked or fully clipped token) is written as zeros without reading the
// logits, so NaN/inf in a masked row never reaches its gradient (kernels.h contract). `buf` holds
// kChunk floats. With a finite `kept_min` (lse and entropy then over the kept set) every entry
// outside the kept set, the token's included, gets exactly 0.
RLFUSE_ALWAYS_INLINE void row_gradient(const char* src, char* dst, DType dtype, int64_t vocab, float inv_temp,
                                       float g_logp, float g_entropy, float entropy, float lse, int64_t y,
                                       float* buf, float kept_min = -INFINITY) {
  const int64_t esize = element_size(dtype);
  if (g_logp == 0.0f && g_entropy == 0.0f) {
    std::memset(dst, 0, vocab * esize);
    return;
  }
  const GradCoeffs c = grad_coeffs(g_logp, g_entropy, entropy, inv_temp);
  // Outside the kept set the token's 1[j = y] term is dropped too (its p_j is 0 like every other).
  const bool target_kept = !(kept_min > -INFINITY) || !(target_logit(src, dtype, vocab, inv_temp, y) < kept_min);
  const int64_t target = target_kept ? y : -1;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const int64_t padded = load_chunk(src, dtype, start, n, inv_temp, buf, kept_min);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const Vec logp = load_vec(buf + i) - lse;
      const Vec p = exp_nonpositive(logp);
      store_vec(buf + i, p == 0.0f ? splat(0.0f) : p * (c.base + c.slope * logp));
    }
    if (target >= start && target < start + n) buf[target - start] += c.target;
    store_converted(buf, n, dtype, dst + start * esize);
  }
}

// The two-row ops (KL, JSD): reads row `row` of a.logits and a.other (scaled by the row's 1/T) into
// x and y (kChunk floats each), chunk by chunk, and calls body(start, n, padded) after each chunk.
template <typename PairArgs, typename Body>
RLFUSE_ALWAYS_INLINE void for_each_pair_chunk(const PairArgs& a, int64_t row, float* x, float* y, Body body) {
  const char* src_x = row_pointer(a.logits, a.dtype, a.layout, row);
  const char* src_y = row_pointer(a.other, a.dtype, a.other_layout, row);
  const float inv_temp = row_inv_temp(a, row);
  for (int64_t start = 0; start < a.vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - start);
    const int64_t padded = load_chunk(src_x, a.dtype, start, n, inv_temp, x);
    load_chunk(src_y, a.dtype, start, n, inv_temp, y);
    body(start, n, padded);
  }
}

// Gradient pass of a two-row op (KlDivBwdArgs, JsdBwdArgs: logits x and other y, same field names):
// upstream g = grad[row] * inv_temp; a row with g == 0 is written as zeros without reading the inputs
// (masked rows may hold garbage). Otherwise, per chunk of both rows (x, y: kChunk floats each),
// element(x_lanes, y_lanes, g) returns the lanes' gradients (dx, dy), and each requested gradient
// (null: not requested) is stored in `dtype`.
template <typename PairArgs, typename Element>
RLFUSE_ALWAYS_INLINE void pair_gradient_row(const PairArgs& a, int64_t row, float upstream, float* x, float* y,
                                            Element element) {
  const int64_t esize = element_size(a.dtype);
  char* dst_x = a.grad_logits ? const_cast<char*>(row_pointer(a.grad_logits, a.dtype, a.grad_layout, row)) : nullptr;
  char* dst_y = a.grad_other ? const_cast<char*>(row_pointer(a.grad_other, a.dtype, a.grad_other_layout, row)) : nullptr;
  const float inv_temp = row_inv_temp(a, row);
  const float g = upstream * inv_temp;
  if (g == 0.0f) {
    if (dst_x) std::memset(dst_x, 0, a.vocab * esize);
    if (dst_y) std::memset(dst_y, 0, a.vocab * esize);
    return;
  }
  for_each_pair_chunk(a, row, x, y, [&](int64_t start, int64_t n, int64_t padded) {
    for (int64_t i = 0; i < padded; i += kLanes) {
      const auto [gx, gy] = element(load_vec(x + i), load_vec(y + i), g);
      store_vec(x + i, gx);
      store_vec(y + i, gy);
    }
    if (dst_x) store_converted(x, n, a.dtype, dst_x + start * esize);
    if (dst_y) store_converted(y, n, a.dtype, dst_y + start * esize);
  });
}

// A top-k entry and the selection order of the top-k kernels (row_topk, troll): strict "ranks
// before": larger value first, then lower id.
struct Entry {
  float value;
  int32_t id;
};

RLFUSE_ALWAYS_INLINE bool ranks_before(const Entry& a, const Entry& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

}  // namespace rlfuse::cpu
