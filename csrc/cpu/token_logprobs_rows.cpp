// Row kernels of the CPU token_logprobs backend (SPEC.md sections 1-2): one pass over each row
// forward, one read + one write backward. The vocabulary is walked in L1-sized chunks converted
// to fp32 and processed kLanes at a time. Compiled once per instruction set: RLFUSE_CPU_ISA
// names the namespace (see CMakeLists.txt and token_logprobs.cpp, which dispatches).
#include <algorithm>
#include <cmath>

#include "cpu_kernels.h"
#include "rlfuse/row_math.h"
#include "vec_math.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {
namespace {

const char* row_pointer(const void* base, DType dtype, const RowLayout& layout, int64_t row) {
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

}  // namespace

void forward_rows(const TokenLogprobsFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float x[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    RowStats stats = empty_stats();
    for (int64_t start = 0; start < a.vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - start);
      load_scaled(src + start * element_size(a.dtype), a.dtype, n, a.inv_temp, x);
      const int64_t padded = pad_to_lanes(x, n);
      const float m = chunk_max(x, padded);
      if (m != m) {
        stats = RowStats{NAN, NAN, NAN};
        break;
      }
      if (m > stats.max) stats = rebase(stats, m);
      if (stats.max != -INFINITY) accumulate_chunk(x, padded, stats);
    }
    const int64_t y = a.tokens[row];
    float x_target = NAN;
    if (y >= 0 && y < a.vocab) load_scaled(src + y * element_size(a.dtype), a.dtype, 1, a.inv_temp, &x_target);
    const RowResult r = finalize(stats, x_target);
    a.logp[row] = r.logp;
    a.entropy[row] = r.entropy;
    a.lse[row] = r.lse;
  }
}

void backward_rows(const TokenLogprobsBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  const int64_t esize = element_size(a.dtype);
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    char* dst = const_cast<char*>(row_pointer(a.grad_logits, a.dtype, a.grad_layout, row));
    const GradCoeffs c = grad_coeffs(a.grad_logp[row], a.grad_entropy[row], a.entropy[row], a.inv_temp);
    const float lse = a.lse[row];
    const int64_t y = a.tokens[row];
    for (int64_t start = 0; start < a.vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - start);
      load_scaled(src + start * esize, a.dtype, n, a.inv_temp, buf);
      const int64_t padded = pad_to_lanes(buf, n);
      for (int64_t i = 0; i < padded; i += kLanes) {
        const Vec logp = load_vec(buf + i) - lse;
        const Vec p = exp_nonpositive(logp);
        store_vec(buf + i, p == 0.0f ? splat(0.0f) : p * (c.base + c.slope * logp));
      }
      if (y >= start && y < start + n) buf[y - start] += c.target;
      store_converted(buf, n, a.dtype, dst + start * esize);
    }
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
