// Sampling on the GPU (docs/SPEC.md section 8; the contract is the comment above kernels.h SampleArgs).
//
// One block per row, as in row_kernels.cuh (blocks loop over rows past kMaxGrid). Per row:
//   1. Temperature: with `adaptive`, row_kernels' statistics pass at T = 1 gives H1 and the row's
//      T (thread 0, broadcast through shared memory; the CPU backend's map operation for
//      operation); otherwise T = temperature[row]. 1 / T is rounded as 1.0f / T.
//   2. Statistics at T (row_stats: max, lse, entropy); skipped when step 1 already has them
//      (adaptive T == 1, or greedy, which uses T = 1).
//   3. Thresholds on x = z * (1 / T), as keys: the order-preserving uint32 of x's bits, -0.0
//      folded into +0.0. The kept set is {x >= f(K)} for the final key K, f its float.
//        - min-p: K_m = key(max + log(min_p)), at most key(max); no pass (log through double, to
//          agree with the CPU backend's std::log).
//        - top-k: the largest K with count{x >= f(K)} >= k (one counting search, below);
//        - top-p: the largest K with mass{x >= f(K)} >= top_p * mass{x >= f(K_k)}, searched only
//          above max(K_k, K_m) (the final threshold is the maximum of the three) and above
//          L_p = key(max + log(0.5 (1 - top_p) / n_k)), n_k = count{x >= f(K_k)}: the entries
//          below L_p hold at most n_k e^(L_p - max) = 0.5 (1 - top_p) <= 0.5 (1 - top_p) mass{...}
//          of mass (mass{x >= f(K_k)} >= 1, the maximum's own), so the predicate holds at L_p.
//        mass{S} = sum over S of exp2((x - max) log2 e), fp32, in one fixed order.
//   4. For each draw s: one pass, argmax over kept j of x_j + G_j (ties to the lower j) with
//      G_j = -log(-log u_j), u_j = rng_uniform(rng_bits(rng_row_key(seed, s), j)) (row_math.h,
//      bit-exact with the CPU backend); draw 0 also sums the kept mass (once per row). Thread 0
//      re-reads the winner's logit and writes token, log-prob under the kept set renormalised and
//      under the unfiltered distribution at T (each as (x - max) - log(mass), never x - lse). A
//      draw nothing won (only rows the caller rejects: NaN, +inf) takes the row's first maximum,
//      so the token is always in [0, V). Greedy (T == 0, or not > 0): one argmax pass of x
//      at T = 1, log-prob 0, raw log-prob and entropy at T = 1.
//   Score mode (score_tokens): no draw; one pass sums the kept mass as draw 0 would, and thread 0
//   scores the given token with the draw's expressions (write_score). kept_min: the threshold.
//
// The searches (step 3) are bisection on the key generalised to kPivots pivots per pass: one pass
// over the row counts (top-k) or sums the mass (top-p) of {x >= f(p_i)} for every pivot p_i at
// once, plus the smallest x >= f(lo) and the largest x < f(hi) of the window [lo, hi) holding
// the answer. After the block reduction every thread takes the same decision: lo = the largest
// pivot whose predicate holds, hi = the smallest whose predicate fails (the predicates are
// monotone in the pivot: counts trivially, masses because every pivot's sum adds the same terms
// in the same fixed order, some replaced by 0, and rounding is monotone), then the window snaps to
// the data: lo up to the smallest entry in it, hi down to just above the largest (the kept set
// only changes at data keys). The search ends when the window is one key wide, which the snapping
// reaches as soon as one distinct value is left in it. Pivots: 3 at the key quartiles (at least 2
// bits per pass, so at most 16 passes), 4 spread in value space (at 1, 4, 16, 64 below the top
// while lo is -inf, then evenly between f(lo) and the top), which find the region of a real row
// in a pass or two. Emulated over synthetic 152K rows (fp32 and bf16): top-k (k = 20..1000) in
// 4-8 passes, top-p after it in 1-5.
//
// Row reads: 1 (statistics) + 1 with adaptive T != 1 + the top-k search passes (only when
// 0 < top_k < V) + the top-p search passes (only when top_p < 1) + num_samples draws. Greedy: 2.
// Rows are <= ~300 KB, so reads after the first are mostly L2 hits.
//
// Draw-pass work is per kept element only: entries below the threshold cost a compare. A kept
// entry computes its random bits and the two logarithms only when it can still beat the thread's
// best (x + G_cap >= best, G_cap >= every G_j), so most entries of an unfiltered row skip them.
// rng_uniform never returns 1 (it tops out at 1 - 2^-24); gumbel() still maps u == 1 to -inf, as
// the CPU backend's race would score it, so the guard documents the shared semantics.
//
// Thread 0 alone updates the shared search state (filter parameters, windows, stage), always
// between barriers and never a field another thread may still be reading; little per-row state
// stays in registers across a search, which keeps every instantiation within the 64 registers of
// kMinBlocks without spills.
//
// Determinism: every sum is a per-thread sequence in walk order, then a fixed xor-butterfly over
// the warp and a fixed sequential sum over the warps; the argmax is a total order (value, then
// id). No atomics. Counts are 32-bit: rows up to 2^32 - 1 entries (the random counter is 32-bit
// too).

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

constexpr int kPivots = 7;            // thresholds tested per search pass
constexpr int kKeyPivots = 3;         // of them at the key quartiles
constexpr int kValuePivots = kPivots - kKeyPivots;
constexpr int kMaxSearchPasses = 24;  // > the 16 the key quartiles guarantee; never reached
constexpr int kSearchFields = kPivots + 3;  // accumulators, base mass, window min, window max
constexpr int kSearchLoads = 1;       // 16-byte loads in flight per thread in a search pass: ~25
constexpr int kDrawLoads = 2;         // 16-byte loads in flight in a draw pass (compute-heavy)
constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf): the smallest non-NaN key
constexpr uint32_t kPosInfKey = 0xff800000u;  // order_key(+inf): the largest non-NaN key
constexpr uint32_t kNoColumn = 0xffffffffu;   // no candidate (vocab < 2^32 - 1 is required)

// ---- keys -------------------------------------------------------------------------------------

// Order-preserving key of x (a larger x has a larger key; -0.0 and +0.0 share +0.0's).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// The float of a key; keys in [kNegInfKey, kPosInfKey] are not NaN.
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) != 0 ? key & 0x7fffffffu : ~key);
}

// log(v) for min-p's threshold, through double: correctly rounded but for rare double-rounding
// cases, so it agrees with the CPU backend's std::log (glibc's logf, also computed in double).
__device__ __forceinline__ float log_rn(float v) {
  return static_cast<float>(log(static_cast<double>(v)));
}

// x as every pass computes it: one rounded multiply, never contracted.
__device__ __forceinline__ float scaled(float z, float inv_temp) { return __fmul_rn(z, inv_temp); }

// exp(x - max) on the special function unit; the mass every search and the kept set sum.
__device__ __forceinline__ float mass_of(float x, float row_max) {
  return fast_exp2(__fmul_rn(__fsub_rn(x, row_max), kLog2e));
}

// -log(-log u) for u in (0, 1) (rng_uniform's range is [2^-24, 1 - 2^-24]). A u == 1 would get
// G = -inf, as the CPU backend's race scores it (e_j / -log(1) = -inf).
__device__ __forceinline__ float gumbel(float u) { return u < 1.0f ? -logf(-logf(u)) : -INFINITY; }

// ---- row walk ---------------------------------------------------------------------------------

// Walks one row as row_kernels.cuh's walk_row does (head and tail elements, kLoads 16-byte vectors
// per step, the remaining vectors) and calls visit(col, z) for every element the thread owns. Its
// own copy for the register budget of the search and draw passes: 32-bit indices and one edge
// element per thread (the statistics pass, row_stats, keeps walk_row's order).
template <typename T, int kBlock, int kLoads, typename Visit>
__device__ __forceinline__ void for_each_logit(const T* logits, int64_t vocab, Visit& visit) {
  using Vec = Pack<T>;
  constexpr uint32_t kSize = Vec::kSize;
  const uint32_t tid = threadIdx.x;
  const RowSplit split = split_row(logits, vocab);
  const Vec* vecs = reinterpret_cast<const Vec*>(logits + split.head);
  // 32-bit indices (vocab < 2^32): fewer registers than the 64-bit walk.
  const auto head = static_cast<uint32_t>(split.head);
  const auto vectors = static_cast<uint32_t>(split.vectors);
  const auto tail = static_cast<uint32_t>(split.tail);

  // Head and tail are each shorter than one vector: threads [0, head) take the head, the next
  // vocab - tail threads the tail, one element each (one address to keep per thread, not two).
  const uint32_t edge = tid < head ? tid : tail + (tid - head);
  if (edge < static_cast<uint32_t>(vocab)) {
    visit(edge, to_float(logits[edge]));
  }

  uint32_t i = tid;
  for (; i + (kLoads - 1) * kBlock < vectors; i += kLoads * kBlock) {
    Vec pack[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) pack[u] = load(vecs + (i + u * kBlock));  // loads first
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      float z[kSize];
      unpack(pack[u], z);
      const uint32_t col = head + (i + u * kBlock) * kSize;
#pragma unroll
      for (uint32_t k = 0; k < kSize; ++k) visit(col + k, z[k]);
    }
  }
  for (; i < vectors; i += kBlock) {
    float z[kSize];
    unpack(load(vecs + i), z);
    const uint32_t col = head + i * kSize;
#pragma unroll
    for (uint32_t k = 0; k < kSize; ++k) visit(col + k, z[k]);
  }
}

// ---- block reductions ---------------------------------------------------------------------------

// Shared scratch of the search and draw reductions: one word row per warp. Each reduction ends
// with a barrier after its reads, so the next may write at once.
template <int kBlock>
struct Scratch {
  static constexpr int kWarps = kBlock / kWarpSize;
  uint32_t words[kWarps][kSearchFields];
};

__device__ __forceinline__ float shuffle_sum(float v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;  // a + b == b + a: every lane ends with the same bits
}

__device__ __forceinline__ uint32_t shuffle_sum(uint32_t v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

__device__ __forceinline__ float shuffle_min(float v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = fminf(v, __shfl_xor_sync(0xffffffffu, v, mask));
  }
  return v;
}

__device__ __forceinline__ float shuffle_max(float v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, mask));
  }
  return v;
}

__device__ __forceinline__ uint32_t to_word(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t to_word(uint32_t v) { return v; }
__device__ __forceinline__ void from_word(uint32_t w, float& v) { v = __uint_as_float(w); }
__device__ __forceinline__ void from_word(uint32_t w, uint32_t& v) { v = w; }

// One search pass's per-thread accumulators: acc[i] for pivot i (count or mass), the base mass
// (top-p's mass{x >= f(K_k)}), the smallest x >= f(lo) and the largest x < f(hi).
template <typename Acc>
struct SearchAcc {
  Acc acc[kPivots];
  float base;
  float low;
  float high;
};

// Publishes the warp totals of `s` to `scratch` (lane 0 of each warp) and waits for all warps.
template <int kBlock, typename Acc>
__device__ __forceinline__ void publish_search(SearchAcc<Acc> s, Scratch<kBlock>& scratch) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int i = 0; i < kPivots; ++i) s.acc[i] = shuffle_sum(s.acc[i]);
  s.base = shuffle_sum(s.base);
  s.low = shuffle_min(s.low);
  s.high = shuffle_max(s.high);
  if (lane == 0) {
    uint32_t* words = scratch.words[warp];
#pragma unroll
    for (int i = 0; i < kPivots; ++i) words[i] = to_word(s.acc[i]);
    words[kPivots] = to_word(s.base);
    words[kPivots + 1] = to_word(s.low);
    words[kPivots + 2] = to_word(s.high);
  }
  __syncthreads();
}

// The block totals from the published warp totals, summed in warp order (fixed).
template <int kBlock, typename Acc>
__device__ __forceinline__ SearchAcc<Acc> search_totals(const Scratch<kBlock>& scratch) {
  SearchAcc<Acc> total;
#pragma unroll
  for (int i = 0; i < kPivots; ++i) from_word(scratch.words[0][i], total.acc[i]);
  from_word(scratch.words[0][kPivots], total.base);
  from_word(scratch.words[0][kPivots + 1], total.low);
  from_word(scratch.words[0][kPivots + 2], total.high);
#pragma unroll 1
  for (int w = 1; w < Scratch<kBlock>::kWarps; ++w) {
    const uint32_t* words = scratch.words[w];
#pragma unroll
    for (int i = 0; i < kPivots; ++i) {
      Acc a;
      from_word(words[i], a);
      total.acc[i] += a;
    }
    total.base += __uint_as_float(words[kPivots]);
    total.low = fminf(total.low, __uint_as_float(words[kPivots + 1]));
    total.high = fmaxf(total.high, __uint_as_float(words[kPivots + 2]));
  }
  return total;
}

// A draw's candidate: x_j + G_j (x_j when greedy) and j; better() is a total order on non-NaN
// values (NaN values never win).
struct Candidate {
  float value;
  uint32_t col;  // kNoColumn: none
};

__device__ __forceinline__ bool better(float value, uint32_t col, const Candidate& than) {
  return value > than.value || (value == than.value && col < than.col);
}

struct DrawAcc {
  Candidate best;
  float mass;  // kept mass (draw 0 only)
};

// Block-wide result of a draw pass, valid in thread 0.
template <int kBlock>
__device__ __forceinline__ DrawAcc block_reduce_draw(DrawAcc d, Scratch<kBlock>& scratch) {
  constexpr int kWarps = Scratch<kBlock>::kWarps;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    const float value = __shfl_xor_sync(0xffffffffu, d.best.value, mask);
    const uint32_t col = __shfl_xor_sync(0xffffffffu, d.best.col, mask);
    if (better(value, col, d.best)) d.best = Candidate{value, col};
  }
  d.mass = shuffle_sum(d.mass);
  uint32_t(*words)[kSearchFields] = scratch.words;
  if (lane == 0) {
    words[warp][0] = __float_as_uint(d.best.value);
    words[warp][1] = d.best.col;
    words[warp][2] = __float_as_uint(d.mass);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll 1
    for (int w = 0; w < kWarps; ++w) {  // fixed order
      const float value = __uint_as_float(words[w][0]);
      const uint32_t col = words[w][1];
      if (w == 0 || better(value, col, d.best)) d.best = Candidate{value, col};
      d.mass = w == 0 ? __uint_as_float(words[w][2]) : d.mass + __uint_as_float(words[w][2]);
    }
  }
  __syncthreads();
  return d;
}

// ---- threshold search ---------------------------------------------------------------------------

// The pivots of window [lo, hi) (hi - lo >= 2), all in [lo + 1, hi - 1], in no particular order.
__device__ __forceinline__ void make_pivots(uint32_t lo, uint32_t hi, float low_value,
                                            uint32_t (&pivot)[kPivots]) {
  const uint64_t span = hi - lo - 1;  // >= 1
#pragma unroll
  for (int i = 0; i < kKeyPivots; ++i) {
    pivot[i] = lo + 1 + static_cast<uint32_t>(span * (i + 1) / (kKeyPivots + 1));
  }
  if (span < 64) {
#pragma unroll
    for (int i = 0; i < kValuePivots; ++i) {
      pivot[kKeyPivots + i] = lo + 1 + static_cast<uint32_t>(span * (i + 1) / (kValuePivots + 1));
    }
    return;
  }
  const float top = key_value(hi - 1);
  const float width = __fsub_rn(top, low_value);  // +inf while lo is -inf: unused then
#pragma unroll
  for (int i = 0; i < kValuePivots; ++i) {
    constexpr float kStep = 1.0f / (kValuePivots + 1);
    const float value = low_value == -INFINITY
                            ? __fsub_rn(top, static_cast<float>(1 << (2 * i)))  // 1, 4, 16, 64
                            : __fadd_rn(low_value, __fmul_rn(width, kStep * (i + 1)));
    pivot[kKeyPivots + i] = min(max(order_key(value), lo + 1), hi - 1);
  }
}

// The per-row threshold state, in shared memory. Thread 0 alone writes it (between barriers):
// the row's filter parameters, then each search's window after each pass; every thread reads
// what it needs after a barrier, so nothing of it stays in registers over a pass or a search.
struct SearchState {
  uint32_t lo;        // the predicate holds at lo (or lo is the caller's lower bound)
  uint32_t hi;        // it fails at hi
  uint32_t count;     // counting search: count{x >= f(lo)} (vocab while lo is the initial one)
  float target;       // mass search: top_p * mass{x >= f(base_key)}, from the first pass
  uint32_t k;         // counting search: top_k
  uint32_t base_key;  // mass search: K_k, whose mass top_p scales
  float top_p;
  uint32_t top;       // key(max x): the maximum is always kept
  uint32_t floor_key; // K_m (min-p), or the key of -inf
  uint32_t key;       // the row's threshold so far
  int stage;          // what comes next: kStageCount, kStageMass or kStageDone
  bool search;        // kStageMass: whether the window above L_p needs a search
};

constexpr int kStageCount = 0;
constexpr int kStageMass = 1;
constexpr int kStageDone = 2;

// The largest key K in [state.lo, state.hi) whose predicate holds, where the predicate is taken
// to hold at lo (the caller knows it does, or only needs max(lo, answer)) and fails at hi:
//   kMass = false: count{x >= f(K)} >= k;
//   kMass = true:  mass{x >= f(K)} >= top_p * mass{x >= f(base_key)}.
// The answer is left in state.lo (and state.count); two barriers per pass, the last one after
// thread 0's final update. The caller has set the state up (and put a barrier after it).
template <bool kMass, typename T, int kBlock>
__device__ __forceinline__ void threshold_search(const T* logits, int64_t vocab, float inv_temp,
                                                 float row_max, Scratch<kBlock>& scratch,
                                                 SearchState& state) {
  using Acc = typename std::conditional<kMass, float, uint32_t>::type;
  for (int pass = 0; pass < kMaxSearchPasses; ++pass) {
    {
      const uint32_t pass_lo = state.lo;
      const uint32_t pass_hi = state.hi;
      if (pass_hi - pass_lo <= 1) break;  // the same in every thread
      const float low_value = key_value(pass_lo);
      const float high_value = pass_hi > kPosInfKey ? INFINITY : key_value(pass_hi);
      float pivot_value[kPivots];
      {
        uint32_t pivot[kPivots];
        make_pivots(pass_lo, pass_hi, low_value, pivot);
#pragma unroll
        for (int i = 0; i < kPivots; ++i) pivot_value[i] = key_value(pivot[i]);
      }
      const float base_value = key_value(state.base_key);

      SearchAcc<Acc> s;
#pragma unroll
      for (int i = 0; i < kPivots; ++i) s.acc[i] = Acc{0};
      s.base = 0.0f;
      s.low = INFINITY;
      s.high = -INFINITY;
      auto visit = [&](uint32_t, float z) {
        const float x = scaled(z, inv_temp);
        if constexpr (kMass) {
          const float e = mass_of(x, row_max);
#pragma unroll
          for (int i = 0; i < kPivots; ++i) s.acc[i] += x >= pivot_value[i] ? e : 0.0f;
          if (pass == 0) s.base += x >= base_value ? e : 0.0f;
        } else {
#pragma unroll
          for (int i = 0; i < kPivots; ++i) s.acc[i] += x >= pivot_value[i] ? 1u : 0u;
        }
        s.low = fminf(s.low, x >= low_value ? x : INFINITY);
        s.high = fmaxf(s.high, x < high_value ? x : -INFINITY);
      };
      for_each_logit<T, kBlock, kSearchLoads>(logits, vocab, visit);
      publish_search<kBlock>(s, scratch);
    }

    if (threadIdx.x == 0) {
      // Thread 0 alone: the totals, the pivots again (from the state, not kept over the pass),
      // the predicates and the new window.
      const SearchAcc<Acc> total = search_totals<kBlock, Acc>(scratch);
      SearchState next = state;
      if (kMass && pass == 0) next.target = __fmul_rn(next.top_p, total.base);
      uint32_t pivot[kPivots];
      make_pivots(next.lo, next.hi, key_value(next.lo), pivot);
      uint32_t new_lo = next.lo;
      uint32_t new_hi = next.hi;
#pragma unroll
      for (int i = 0; i < kPivots; ++i) {
        bool holds;
        if constexpr (kMass) {
          holds = total.acc[i] >= next.target;
        } else {
          holds = total.acc[i] >= next.k;
        }
        // Equal pivots (narrow windows) give equal totals, so ties are harmless.
        if (holds && pivot[i] > new_lo) {
          new_lo = pivot[i];
          if constexpr (!kMass) next.count = total.acc[i];
        }
        if (!holds && pivot[i] < new_hi) new_hi = pivot[i];
      }
      // Snap to the data: no entry lies in [new_lo, a) nor in [b + 1, new_hi), so those keys
      // give the same sets as new_lo and new_hi. A window without entries means new_lo's set is
      // the answer's.
      const uint32_t a = order_key(total.low);   // smallest entry >= f(lo) (+inf: none)
      const uint32_t b = order_key(total.high);  // largest entry < f(hi) (-inf: none, or -inf)
      if (a >= new_hi || b < new_lo) {
        next.lo = new_lo;
        next.hi = new_lo + 1;
      } else {
        next.lo = max(new_lo, a);
        next.hi = min(new_hi, b + 1);
      }
      state = next;
    }
    __syncthreads();
  }
}

// ---- draw pass ----------------------------------------------------------------------------------

// argmax over kept j (x_j >= threshold) of x_j + G_j (kNoise) or x_j (greedy); with `want_mass`
// also the kept mass. Result valid in thread 0.
template <bool kNoise, typename T, int kBlock>
__device__ __forceinline__ DrawAcc draw_pass(const T* logits, int64_t vocab, float inv_temp,
                                             float row_max, float threshold, uint32_t row_key,
                                             bool want_mass, Scratch<kBlock>& scratch) {
  // The Gumbel of the largest u below 1, plus a margin for logf's rounding: G_j <= gumbel_cap
  // for every j (u == 1 gives -inf).
  const float gumbel_cap = -logf(-logf(1.0f - 5.9604644775390625e-8f)) + 1e-3f;
  DrawAcc d{Candidate{-INFINITY, kNoColumn}, 0.0f};
  auto visit = [&](uint32_t col, float z) {
    const float x = scaled(z, inv_temp);
    if (!(x >= threshold)) return;
    if (want_mass) d.mass += mass_of(x, row_max);
    if (kNoise) {
      // x + G <= x + gumbel_cap < best: the entry cannot reach the thread's best (nor tie it),
      // whatever its random bits, which are then not computed.
      if (__fadd_rn(x, gumbel_cap) < d.best.value) return;
      const float value = __fadd_rn(x, gumbel(rng_uniform(rng_bits(row_key, col))));
      if (better(value, col, d.best)) d.best = Candidate{value, col};
    } else {
      if (better(x, col, d.best)) d.best = Candidate{x, col};
    }
  };
  for_each_logit<T, kBlock, kDrawLoads>(logits, vocab, visit);
  return block_reduce_draw<kBlock>(d, scratch);
}

// ---- kernel -------------------------------------------------------------------------------------

// Per-row values thread 0 hands the block (and keeps for its own output writes).
struct RowPlan {
  float inv_temp;     // 1 / T (1 when greedy)
  float max;          // max x
  float sum;          // sum exp(x - max)
  float temperature;  // the row's T (adaptive: from the entropy at T = 1)
};

// The CPU backend's map, operation for operation: w = clamp((H1 - h_low) / span, 0, 1) for
// span = h_high - h_low > 0, else the step 1[H1 >= h_high]; T = t_min + (t_max - t_min) w with one
// rounding (the CPU build contracts it to an FMA, as GCC does for x86-64 AVX2 and aarch64).
__device__ __forceinline__ float adaptive_temperature(const SampleArgs& args, float entropy) {
  const float span = __fsub_rn(args.h_high, args.h_low);
  float w;
  if (span > 0.0f) {
    w = fminf(fmaxf(__fdiv_rn(__fsub_rn(entropy, args.h_low), span), 0.0f), 1.0f);  // NaN -> 0
  } else {
    w = entropy >= args.h_high ? 1.0f : 0.0f;
  }
  return __fmaf_rn(__fsub_rn(args.t_max, args.t_min), w, args.t_min);
}

// 1 / t, correctly rounded (bitwise 1.0f / t, as the CPU backend) for t and 1 / t normal, without
// the IEEE division's slow-path subroutine (a call there makes the kernel spill): the approximate
// reciprocal (<= 1 ulp) and whichever of it and its two neighbours has the smallest residual
// |1 - t r| (exact through the fma). Checked exhaustively for every mantissa against 1.0f / t with
// the estimate up to 3 ulp off.
__device__ __forceinline__ float reciprocal(float t) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  if (!(r > FLT_MIN && r < FLT_MAX)) return r;  // t <= 0, huge, tiny or NaN: as it is
  const float up = __uint_as_float(__float_as_uint(r) + 1);
  const float down = __uint_as_float(__float_as_uint(r) - 1);
  float best = r;
  float residual = fabsf(__fmaf_rn(-t, r, 1.0f));
  const float residual_up = fabsf(__fmaf_rn(-t, up, 1.0f));
  const float residual_down = fabsf(__fmaf_rn(-t, down, 1.0f));
  if (residual_up < residual) {
    best = up;
    residual = residual_up;
  }
  if (residual_down < residual) best = down;
  return best;
}

__device__ __forceinline__ float inverse_temperature(float temperature) {
  return temperature > 0.0f ? reciprocal(temperature) : 1.0f;  // greedy (T == 0, or not > 0): 1
}

// Steps 1-2: the row's temperature and its statistics at T, published in `plan`; the entropy
// output is written here. One statistics pass, or two when adaptive with T != 1. Little stays
// live over row_stats (thread 0 re-reads what it needs after it), so that pass keeps its registers.
template <typename T, int kBlock>
__device__ __forceinline__ void plan_row(const SampleArgs& args, int64_t row, const T* logits,
                                         RowStats* warp_stats, RowPlan& plan) {
  float inv_temp = args.adaptive ? 1.0f : inverse_temperature(args.temperature[row]);
  for (bool first = true;; first = false) {
    const RowStats stats = row_stats<T, kBlock>(logits, args.vocab, inv_temp, warp_stats);
    if (threadIdx.x == 0) {
      const RowResult result = finalize(stats, 0.0f);
      float temperature;
      if (!args.adaptive) {
        temperature = args.temperature[row];
      } else if (first) {
        temperature = adaptive_temperature(args, result.entropy);
      } else {
        temperature = plan.temperature;  // thread 0's own write of the first pass
      }
      plan = RowPlan{inv_temp, stats.max, stats.sum, temperature};
      if (inverse_temperature(temperature) == inv_temp) args.entropy[row] = result.entropy;
    }
    __syncthreads();
    // Every thread reads `plan` before the next row_stats's barriers, after which thread 0 may
    // overwrite it. Non-adaptive, or adaptive with T == 1 or greedy: done after one pass; the
    // second adaptive pass always ends here.
    const float next = inverse_temperature(plan.temperature);
    if (next == inv_temp) return;
    inv_temp = next;
  }
}

// Step 3: the threshold (the same in every thread). Thread 0 does the bookkeeping between the
// searches in `state`; the other threads only follow state.stage.
template <typename T, int kBlock>
__device__ __forceinline__ float row_threshold(const SampleArgs& args, int64_t row,
                                               const T* logits, float inv_temp, float row_max,
                                               Scratch<kBlock>& scratch, SearchState& state) {
  const int64_t vocab = args.vocab;
  if (threadIdx.x == 0) {
    // The previous row's last reads of `state` were before the barrier ending plan_row.
    const int32_t top_k = args.top_k != nullptr ? args.top_k[row] : 0;
    const float top_p = args.top_p != nullptr ? args.top_p[row] : 1.0f;
    const float min_p = args.min_p != nullptr ? args.min_p[row] : 0.0f;
    const uint32_t top = order_key(row_max);
    uint32_t floor_key = kNegInfKey;  // min-p
    if (min_p > 0.0f) floor_key = min(order_key(__fadd_rn(row_max, log_rn(min_p))), top);
    const bool use_top_p = top_p < 1.0f;
    // Without top-p only max(K_k, K_m) matters, so the top-k search may start at K_m.
    const uint32_t lo = use_top_p ? kNegInfKey : floor_key;
    const bool use_top_k = top_k > 0 && top_k < vocab && lo < top;
    SearchState init;
    init.lo = lo;
    init.hi = top < kPosInfKey ? top + 1 : top;
    init.count = static_cast<uint32_t>(vocab);
    init.target = 0.0f;
    init.k = static_cast<uint32_t>(top_k);
    init.base_key = kNegInfKey;
    init.top_p = top_p;
    init.top = top;
    init.floor_key = floor_key;
    init.key = floor_key;
    init.stage = use_top_k ? kStageCount : use_top_p ? kStageMass : kStageDone;
    init.search = false;
    state = init;
  }
  __syncthreads();
  if (state.stage == kStageCount) {
    threshold_search<false, T, kBlock>(logits, vocab, inv_temp, row_max, scratch, state);
    if (threadIdx.x == 0) {
      // Only fields no thread is still reading (the others may be at the search's last window
      // test, which reads lo and hi).
      state.base_key = state.lo;  // K_k
      state.key = max(state.lo, state.floor_key);
      state.stage = state.top_p < 1.0f ? kStageMass : kStageDone;
    }
    __syncthreads();
  }
  if (state.stage == kStageMass) {
    if (threadIdx.x == 0) {
      // Top-p is searched above max(K_k, K_m) and above L_p (the header comment). `stage` is
      // not written here: the other threads may still be reading it.
      const float log_excess =
          __fsub_rn(logf(0.5f * (1.0f - state.top_p)), logf(static_cast<float>(state.count)));
      const float bound = __fadd_rn(row_max, log_excess);
      const uint32_t top = state.top;
      const uint32_t lo = min(max(state.key, order_key(bound)), top);
      state.lo = lo;
      state.hi = top < kPosInfKey ? top + 1 : top;
      state.key = lo;
      state.search = lo < top;
    }
    __syncthreads();
    if (state.search) {
      threshold_search<true, T, kBlock>(logits, vocab, inv_temp, row_max, scratch, state);
      if (threadIdx.x == 0) state.key = state.lo;
      __syncthreads();
    }
  }
  return key_value(min(state.key, state.top));  // the maximum is always kept
}

// The first maximum of x = z * inv_temp (the first x > -inf no later entry exceeds, 0 if none;
// NaN never wins), by thread 0 alone: the CPU backend's fallback when no entry won a draw, which
// only rows the caller rejects can cause (NaN, or +inf once scaled, where every score is NaN).
template <typename T>
__device__ __forceinline__ uint32_t first_maximum(const T* logits, int64_t vocab, float inv_temp) {
  uint32_t best = 0;
  float best_value = -INFINITY;
#pragma unroll 1
  for (uint32_t col = 0; col < static_cast<uint32_t>(vocab); ++col) {
    const float x = scaled(to_float(logits[col]), inv_temp);
    if (x > best_value) {
      best = col;
      best_value = x;
    }
  }
  return best;
}

// Thread 0: one draw's outputs. The winner's logit is re-read (x of the same multiply as every
// pass); kept_mass = 0 marks greedy (log-prob 0). A draw that nothing won falls back to the first
// maximum, so the token is always in [0, V): never -1, never a read outside the row.
template <typename T>
__device__ __forceinline__ void write_draw(const SampleArgs& args, int64_t row, int64_t sample,
                                           const T* logits, const RowPlan& plan, uint32_t col,
                                           float kept_mass) {
  if (col >= args.vocab) col = first_maximum(logits, args.vocab, plan.inv_temp);
  const float x = scaled(to_float(logits[col]), plan.inv_temp);
  const float centred = __fsub_rn(x, plan.max);
  const int64_t out = row * args.num_samples + sample;
  args.tokens[out] = int64_t{col};
  args.logprobs[out] = kept_mass == 0.0f ? 0.0f : centred - logf(kept_mass);
  args.raw_logprobs[out] = centred - logf(plan.sum);
}

// Thread 0, score mode (args.score_tokens): the given token's outputs, with write_draw's
// expressions so that a drawn token scores bit for bit as drawn. Kept: x >= threshold, or for a
// greedy row (kept_mass 0) the first maximum `greedy_col` alone; -inf outside; NaN for an id
// outside [0, V) (never read).
template <typename T>
__device__ __forceinline__ void write_score(const SampleArgs& args, int64_t row, const T* logits,
                                            const RowPlan& plan, float threshold, uint32_t greedy_col,
                                            float kept_mass) {
  const int64_t token = args.score_tokens[row];
  args.tokens[row] = token;
  if (token < 0 || token >= args.vocab) {
    args.logprobs[row] = NAN;
    args.raw_logprobs[row] = NAN;
    return;
  }
  const float x = scaled(to_float(logits[token]), plan.inv_temp);
  const float centred = __fsub_rn(x, plan.max);
  const bool kept = kept_mass == 0.0f ? token == int64_t{greedy_col} : x >= threshold;
  args.logprobs[row] = !kept ? -INFINITY : kept_mass == 0.0f ? 0.0f : centred - logf(kept_mass);
  args.raw_logprobs[row] = centred - logf(plan.sum);
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>) sample_kernel(SampleArgs args) {
  __shared__ RowStats warp_stats[kBlock / kWarpSize];
  __shared__ RowPlan plan;
  __shared__ Scratch<kBlock> scratch;
  __shared__ SearchState search_state;

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    plan_row<T, kBlock>(args, row, logits, warp_stats, plan);
    if (args.num_samples == 0) continue;
    // `plan` stays as it is until the next row's statistics pass.
    const float inv_temp = plan.inv_temp;
    const float row_max = plan.max;
    const bool greedy = !(plan.temperature > 0.0f);

    if (greedy) {
      const DrawAcc d = draw_pass<false, T, kBlock>(logits, args.vocab, 1.0f, row_max, -INFINITY,
                                                    0u, false, scratch);
      if (threadIdx.x == 0) {
        // Greedy kept set: the first maximum alone; its threshold reported as the maximum.
        if (args.kept_min != nullptr) args.kept_min[row] = row_max;
        if (args.score_tokens != nullptr) {
          write_score(args, row, logits, plan, row_max, d.best.col, 0.0f);
        } else {
          for (int64_t s = 0; s < args.num_samples; ++s) {
            write_draw(args, row, s, logits, plan, d.best.col, 0.0f);
          }
        }
      }
      continue;
    }

    const float threshold =
        row_threshold<T, kBlock>(args, row, logits, inv_temp, row_max, scratch, search_state);
    if (threadIdx.x == 0 && args.kept_min != nullptr) args.kept_min[row] = threshold;
    if (args.score_tokens != nullptr) {
      // The kept mass as draw 0 sums it (same pass, same order), without the noise.
      const DrawAcc d = draw_pass<false, T, kBlock>(logits, args.vocab, inv_temp, row_max,
                                                    threshold, 0u, true, scratch);
      if (threadIdx.x == 0) write_score(args, row, logits, plan, threshold, 0u, d.mass);
      continue;
    }
    const uint64_t seed = args.seed != nullptr ? args.seed[row] : 0;
    float kept_mass = 0.0f;  // thread 0, from draw 0
    for (int64_t s = 0; s < args.num_samples; ++s) {
      const uint32_t row_key = rng_row_key(seed, static_cast<uint32_t>(s));
      const DrawAcc d = draw_pass<true, T, kBlock>(logits, args.vocab, inv_temp, row_max,
                                                   threshold, row_key, s == 0, scratch);
      if (threadIdx.x == 0) {
        if (s == 0) kept_mass = d.mass;
        write_draw(args, row, s, logits, plan, d.best.col, kept_mass);
      }
    }
  }
}

struct SampleLauncher {
  template <typename T, int kBlock>
  static void launch(const SampleArgs& args, unsigned grid, cudaStream_t stream) {
    sample_kernel<T, kBlock><<<grid, kBlock, 0, stream>>>(args);
  }
};

}  // namespace

int sample_cuda(const SampleArgs& args, void* stream) {
  // Columns, counts and the random counter are 32-bit.
  if (args.num_samples < 0 || args.vocab >= int64_t{kNoColumn}) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch<SampleLauncher>(args, stream);
}

}  // namespace rlfuse
