// Row kernel of the CPU sampler (kernels.h SampleArgs): the row is converted to fp32 once, then
// thresholds are found by bisection over its values (counting / summing passes, no sort) and each
// draw is one exponential race over the kept entries: argmax_j e_j / E_j with E_j = -log(u_j),
// which is Gumbel-max, argmax_j x_j - log(-log u_j), with one logarithm per entry.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {
namespace {

// Order-preserving map between floats (not NaN) and uint32.
RLFUSE_ALWAYS_INLINE uint32_t order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}
RLFUSE_ALWAYS_INLINE float from_order_key(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? k & 0x7FFFFFFFu : ~k);
}

// The statistics of x[0, padded) (padding is -inf), the whole row as one chunk of the shared
// online pass; e[i] = exp(x[i] - max).
RowStats summarise(const float* x, float* e, int64_t padded) {
  RowStats stats = empty_stats();
  online_chunk(x, padded, stats);
  const Vec m = splat(stats.max);
  for (int64_t i = 0; i < padded; i += kLanes) store_vec(e + i, exp_nonpositive(load_vec(x + i) - m));
  return stats;
}

int64_t count_at_least(const float* x, int64_t padded, float t) {
  VecInt count = VecInt{} + 0;
  const Vec tv = splat(t);
  for (int64_t i = 0; i < padded; i += kLanes) count -= (load_vec(x + i) >= tv);  // true is -1
  int64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += count[l];
  return total;
}

float mass_at_least(const float* x, const float* e, int64_t padded, float t) {
  Vec sum = splat(0.0f);
  const Vec tv = splat(t);
  for (int64_t i = 0; i < padded; i += kLanes) sum += load_vec(x + i) >= tv ? load_vec(e + i) : splat(0.0f);
  return lane_sum(sum);
}

// The first maximum of x[0, n): the first x_i > -inf that no later entry exceeds, 0 if there is
// none (NaN entries never win). The token of a greedy row, and the fallback of a draw that no
// entry won, so a token is always in [0, n), never -1 (the CUDA kernel falls back the same way;
// Triton's draw gives id 0 there).
int64_t first_maximum(const float* x, int64_t n) {
  int64_t best = 0;
  float best_value = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] > best_value) {
      best = i;
      best_value = x[i];
    }
  }
  return best;
}

// The largest value t among x such that keep(t) holds (keep is monotone: true for small t).
template <typename Keep>
float largest_threshold(float low, float high, Keep keep) {
  uint32_t lo = order_key(low), hi = order_key(high);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (keep(from_order_key(mid))) lo = mid; else hi = mid - 1;
  }
  return from_order_key(lo);
}

}  // namespace

void sample_rows(const SampleArgs& a, int64_t begin, int64_t end) {
  const int64_t padded = (a.vocab + kLanes - 1) / kLanes * kLanes;
  std::vector<float> x_buf(padded), e_buf(padded);
  float* x = x_buf.data();
  float* e = e_buf.data();
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    float temperature = a.temperature[row];
    if (a.adaptive) {
      load_scaled(src, a.dtype, a.vocab, 1.0f, x);
      pad_to_lanes(x, a.vocab);
      const float h1 = finalize(summarise(x, e, padded), NAN).entropy;
      const float span = a.h_high - a.h_low;
      const float w = span > 0.0f ? std::min(1.0f, std::max(0.0f, (h1 - a.h_low) / span)) : (h1 >= a.h_high ? 1.0f : 0.0f);
      temperature = a.t_min + (a.t_max - a.t_min) * w;
    }
    const bool greedy = temperature == 0.0f;
    load_scaled(src, a.dtype, a.vocab, greedy ? 1.0f : 1.0f / temperature, x);
    pad_to_lanes(x, a.vocab);
    const RowStats summary = summarise(x, e, padded);
    // Log-probs as (x - max) - log(sum), never x - lse: an fp32 lse rounds at its own scale.
    const float log_sum = std::log(summary.sum);
    a.entropy[row] = finalize(summary, NAN).entropy;
    int64_t* tokens = a.tokens + row * a.num_samples;
    float* logprobs = a.logprobs + row * a.num_samples;
    float* raw = a.raw_logprobs + row * a.num_samples;

    // Score mode (a.score_tokens): the row's one "draw" is the given token, scored exactly as a
    // drawn one (so scoring the sampler's tokens gives its logprobs bit for bit); -inf outside the
    // kept set, NaN for an id outside [0, V) (never indexed).
    const int64_t scored = a.score_tokens ? a.score_tokens[row] : -1;
    const bool scored_in_range = scored >= 0 && scored < a.vocab;
    auto write_score = [&](bool kept, float kept_log_sum) {
      tokens[0] = scored;
      logprobs[0] = !scored_in_range ? NAN : kept ? (x[scored] - summary.max) - kept_log_sum : -INFINITY;
      raw[0] = scored_in_range ? (x[scored] - summary.max) - log_sum : NAN;
    };

    if (greedy) {
      // Greedy (docs/SPEC.md section 8): the kept set is the first maximum alone, log-prob 0;
      // kept_min reports the maximum.
      const int64_t best = first_maximum(x, a.vocab);
      if (a.kept_min) a.kept_min[row] = summary.max;
      if (a.score_tokens) {
        write_score(scored == best, 0.0f);
        continue;
      }
      for (int64_t s = 0; s < a.num_samples; ++s) {
        tokens[s] = best;
        logprobs[s] = 0.0f;
        raw[s] = (x[best] - summary.max) - log_sum;
      }
      continue;
    }

    // Thresholds, in order: top-k, then top-p among the survivors, then min-p.
    float lowest = summary.max;
    for (int64_t i = 0; i < a.vocab; ++i) lowest = x[i] > -INFINITY ? std::min(lowest, x[i]) : lowest;
    float threshold = -INFINITY;
    const int64_t k = a.top_k[row];
    if (k > 0 && k < a.vocab) {
      threshold = largest_threshold(lowest, summary.max, [&](float t) { return count_at_least(x, padded, t) >= k; });
    }
    const float top_p = a.top_p[row];
    if (top_p < 1.0f) {
      const float from = std::max(threshold, lowest);
      const float target = top_p * mass_at_least(x, e, padded, from);
      threshold = largest_threshold(from, summary.max, [&](float t) { return mass_at_least(x, e, padded, t) >= target; });
    }
    if (a.min_p[row] > 0.0f) threshold = std::max(threshold, summary.max + std::log(a.min_p[row]));
    const float kept_log_sum = std::log(mass_at_least(x, e, padded, threshold));
    // A threshold at or below the smallest finite x filters nothing: reported as -inf.
    if (a.kept_min) a.kept_min[row] = threshold > lowest ? threshold : -INFINITY;
    if (a.score_tokens) {
      write_score(scored_in_range && x[scored] >= threshold, kept_log_sum);
      continue;
    }

    for (int64_t s = 0; s < a.num_samples; ++s) {
      const uint32_t key = rng_row_key(a.seed[row], static_cast<uint32_t>(s));
      float best_score = -1.0f;
      int64_t best = -1;
      for (int64_t start = 0; start < a.vocab; start += kLanes) {
        Vec u;
        for (int l = 0; l < kLanes; ++l) u[l] = rng_uniform(rng_bits(key, static_cast<uint32_t>(start + l)));
        // Race: score_j = e_j / E_j, E_j = -log(u_j) > 0; excluded entries score -1.
        const Vec score = load_vec(x + start) >= splat(threshold) ? load_vec(e + start) / -log_positive(u)
                                                                    : splat(-1.0f);
        for (int l = 0; l < kLanes && start + l < a.vocab; ++l) {
          if (score[l] > best_score) {
            best_score = score[l];
            best = start + l;
          }
        }
      }
      // No entry won only for rows the caller must reject (NaN, +inf, or +inf once scaled: every
      // score NaN); never return -1 nor read x[-1]: fall back to the first maximum.
      if (best < 0) best = first_maximum(x, a.vocab);
      tokens[s] = best;
      logprobs[s] = (x[best] - summary.max) - kept_log_sum;
      raw[s] = (x[best] - summary.max) - log_sum;
    }
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
