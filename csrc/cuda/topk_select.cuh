// The top-k selection of the CUDA row kernels that need one (row_topk.cu, troll.cu): radix select on
// the order key of x = z * inv_temp, gather of <= kMaxK candidates into shared memory, bitonic sort
// (row_topk.cu's header comment describes the algorithm, its reads and its determinism).
#pragma once

#include "row_kernels.cuh"

namespace rlfuse {
namespace {  // internal to each kernel file that includes it

using namespace row_kernels;  // NOLINT(build/namespaces): the row building blocks

constexpr int kMaxK = 1024;  // largest k, and the candidate capacity of the gather

// The radix select's digits of the 32-bit key, most significant first: bits 31..21, 20..10, 9..0.
template <int kLevel>
struct Digit {
  static constexpr int kBits = kLevel == 2 ? 10 : 11;
  static constexpr int kShift = kLevel == 0 ? 21 : kLevel == 1 ? 10 : 0;
  static constexpr int kBins = 1 << kBits;
};
// The histogram aliases the candidates: 2048 x 4 B = 8 KB.
static_assert(Digit<0>::kBins * sizeof(uint32_t) == kMaxK * sizeof(uint64_t), "one buffer");

// Order-preserving key of x (a larger x has a larger key; -0.0 and +0.0 share one).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits << 1) == 0) bits = 0;  // -0.0 -> +0.0
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// x as every pass computes it: one rounded multiply, never contracted.
__device__ __forceinline__ float scaled(float z, float inv_temp) { return __fmul_rn(z, inv_temp); }

// Selectable: not -inf and not NaN.
__device__ __forceinline__ bool selectable(float x) { return x > -INFINITY; }

// A candidate: sorting these descending gives key descending, then id ascending. 0 is below every
// candidate (keys of selectable entries are >= order_key(-FLT_MAX) > 0), so it pads the sort.
__device__ __forceinline__ uint64_t candidate(uint32_t key, int64_t col) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(col));
}

__device__ __forceinline__ int32_t candidate_id(uint64_t c) {
  return static_cast<int32_t>(~static_cast<uint32_t>(c));
}

// atomicAdd(counter, 1) for each calling thread, one atomic per warp: the lanes that call it
// together (the coalesced group) take consecutive slots.
__device__ __forceinline__ int next_slot(int* counter) {
  const unsigned active = __activemask();
  int lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  const int leader = __ffs(active) - 1;
  int first = 0;
  if (lane == leader) first = atomicAdd(counter, __popc(active));
  first = __shfl_sync(active, first, leader);
  return first + __popc(active & ((1u << lane) - 1));
}

// Block-wide exclusive prefix sum of `value` in thread order; `total` gets the block's sum (in
// every thread). Ends with a barrier, so `warp_counts` (kBlock / 32 ints) may be reused at once.
template <int kBlock>
__device__ __forceinline__ int exclusive_scan(int value, int* warp_counts, int& total) {
  constexpr int kWarps = kBlock / kWarpSize;
  const int lane = thread_index() % kWarpSize;
  const int warp = thread_index() / kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += up;
  }
  if (lane == kWarpSize - 1) warp_counts[warp] = inclusive;
  __syncthreads();
  int before = 0;
  int sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int count = warp_counts[w];
    before += w < warp ? count : 0;
    sum += count;
  }
  __syncthreads();
  total = sum;
  return before + inclusive - value;
}

// The digit of the radix select that holds the rank-th largest entry.
struct Bucket {
  uint32_t digit;
  int above;  // entries in higher digits (rank > above)
  int count;  // entries in this digit (rank <= above + count)
};

// Finds, in a histogram of kBins digits, the digit holding the rank-th largest entry, rank =
// min(want, entries in the histogram), and publishes it in `*bucket` when rank >= 1, and rank in
// `*shared_rank` unless that is null. Returns rank to every thread. Ends with a barrier after
// which both are visible and `hist` is free.
template <int kBlock, int kBins>
__device__ __forceinline__ int select_digit(const uint32_t* hist, int want, int* warp_counts,
                                            Bucket* bucket, int* shared_rank) {
  static_assert(kBins % kBlock == 0, "whole digit ranges per thread");
  constexpr int kPer = kBins / kBlock;
  // Thread t owns digits [top - kPer, top); thread 0 the highest, so the thread-order prefix sum
  // counts the entries above a thread's digits.
  const int top = kBins - thread_index() * kPer;
  int counts[kPer];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    counts[j] = static_cast<int>(hist[top - 1 - j]);
    sum += counts[j];
  }
  int total;
  int above = exclusive_scan<kBlock>(sum, warp_counts, total);
  const int rank = min(want, total);
  if (shared_rank != nullptr && thread_index() == 0) *shared_rank = rank;
  if (rank > above && rank <= above + sum) {  // exactly one thread
    bool found = false;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (!found) {
        if (above + counts[j] >= rank) {
          *bucket = Bucket{static_cast<uint32_t>(top - 1 - j), above, counts[j]};
          found = true;
        } else {
          above += counts[j];
        }
      }
    }
  }
  __syncthreads();
  return rank;
}

template <int kBlock>
__device__ __forceinline__ void clear(uint32_t* hist, int bins) {
  for (int i = thread_index(); i < bins; i += kBlock) hist[i] = 0;
}

// One refinement pass: histogram of digit `level` over the selectable entries whose key matches
// `prefix` in the bits above it.
template <typename T, int kBlock, int kLevel>
__device__ __forceinline__ void refine_histogram(const T* logits, int64_t vocab, float inv_temp,
                                                 uint32_t prefix, uint32_t* hist) {
  constexpr int kShift = Digit<kLevel>::kShift;
  constexpr int kPrefixShift = kShift + Digit<kLevel>::kBits;
  constexpr uint32_t kMask = Digit<kLevel>::kBins - 1;
  walk_row<T, kBlock>(logits, vocab, thread_index(), [&](const auto& z, int64_t, int64_t) {
#pragma unroll
    for (int m = 0; m < chunk_size<decltype(z)>; ++m) {
      const float x = scaled(z[m], inv_temp);
      const uint32_t key = order_key(x);
      if (selectable(x) && (key >> kPrefixShift) == prefix) {
        atomicAdd(&hist[(key >> kShift) & kMask], 1u);
      }
    }
  });
}

// Ordered pass for a tied k-th key: appends the `rank` lowest-id entries with key `key` to
// candidates[first_slot...], walking the row in id order, one element per thread per step, with a
// block-wide prefix sum for the slots; stops as soon as it has them.
template <typename T, int kBlock>
__device__ __forceinline__ void gather_ties(const T* logits, int64_t vocab, float inv_temp,
                                            uint32_t key, int first_slot, int rank,
                                            uint64_t* candidates, int* warp_counts) {
  for (int64_t base = 0, taken = 0; base < vocab && taken < rank; base += kBlock) {
    const int64_t col = base + thread_index();
    bool tie = false;
    if (col < vocab) {
      const float x = scaled(to_float(logits[col]), inv_temp);
      tie = selectable(x) && order_key(x) == key;
    }
    int total;
    const int64_t slot = taken + exclusive_scan<kBlock>(tie ? 1 : 0, warp_counts, total);
    if (tie && slot < rank) candidates[first_slot + slot] = candidate(key, col);
    taken += total;
  }
}

// Sorts candidates[0, n) descending (bitonic, padded with 0 to a power of two, n <= kMaxK).
template <int kBlock>
__device__ __forceinline__ void sort_candidates(uint64_t* candidates, int n) {
  const int tid = thread_index();
  int size = 1;
  while (size < n) size *= 2;
  for (int i = n + tid; i < size; i += kBlock) candidates[i] = 0;
  __syncthreads();
  for (int width = 2; width <= size; width *= 2) {
    for (int stride = width / 2; stride > 0; stride /= 2) {
      for (int pair = tid; pair < size / 2; pair += kBlock) {
        const int lo = 2 * pair - (pair & (stride - 1));
        const int hi = lo + stride;
        const uint64_t a = candidates[lo];
        const uint64_t b = candidates[hi];
        const bool descending = (lo & width) == 0;
        if ((a < b) == descending) {
          candidates[lo] = b;
          candidates[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// The refinement of the radix select after its top digit (step 2 of row_topk.cu): while the entries
// in the selected digit plus all above it are more than kMaxK, one more histogram pass over the
// entries that still match the prefix selects the next digit. The selection says which keys the
// gather takes (>= prefix << shift, or > prefix when ``above + count > kMaxK``: too many ties at
// the exact k-th key).
struct Selection {
  uint32_t prefix;
  int shift;
  int above;
  int count;
};

// One refinement step: digit kLevel of the entries under `s`, if they are still too many.
template <typename T, int kBlock, int kLevel>
__device__ __forceinline__ void refine_digit(const T* row_logits, int64_t vocab, float inv_temp,
                                             uint32_t* hist, int* warp_counts, Bucket* bucket,
                                             int row_need, Selection& s) {
  if (s.above + s.count <= kMaxK) return;
  clear<kBlock>(hist, Digit<kLevel>::kBins);
  __syncthreads();
  refine_histogram<T, kBlock, kLevel>(row_logits, vocab, inv_temp, s.prefix, hist);
  __syncthreads();
  select_digit<kBlock, Digit<kLevel>::kBins>(hist, row_need - s.above, warp_counts, bucket,
                                             nullptr);
  const Bucket b = *bucket;
  s = Selection{(s.prefix << Digit<kLevel>::kBits) | b.digit, Digit<kLevel>::kShift,
                s.above + b.above, b.count};
}

// The whole refinement: `bucket` holds the top digit's selection.
template <typename T, int kBlock>
__device__ __forceinline__ Selection refine_selection(const T* row_logits, int64_t vocab,
                                                      float inv_temp, uint32_t* hist,
                                                      int* warp_counts, Bucket* bucket,
                                                      int row_need) {
  const Bucket b = *bucket;
  Selection s{b.digit, Digit<0>::kShift, b.above, b.count};
  refine_digit<T, kBlock, 1>(row_logits, vocab, inv_temp, hist, warp_counts, bucket, row_need, s);
  refine_digit<T, kBlock, 2>(row_logits, vocab, inv_temp, hist, warp_counts, bucket, row_need, s);
  return s;
}

// Step 1's second half (row_topk.cu): the histogram of the top digit over the selectable entries.
// Ends with a barrier, after which it is complete.
template <typename T, int kBlock>
__device__ __forceinline__ void top_digit_histogram(const T* row_logits, int64_t vocab,
                                                    float inv_temp, uint32_t* hist) {
  walk_row<T, kBlock>(row_logits, vocab, thread_index(), [&](const auto& z, int64_t, int64_t) {
#pragma unroll
    for (int m = 0; m < chunk_size<decltype(z)>; ++m) {
      const float x = scaled(z[m], inv_temp);
      if (selectable(x)) atomicAdd(&hist[order_key(x) >> Digit<0>::kShift], 1u);
    }
  });
  __syncthreads();
}

// Steps 2-4 of row_topk.cu on a row whose top-digit histogram is in `candidates` (top_digit_histogram;
// `*gathered` is 0): radix select, gather and sort. Leaves min(k, selectable entries) in
// `row_need` and the top entries, sorted, in candidates[0, row_need). `row_logits` and `row_need`
// are the kernel's __shared__ variables, taken by reference so that each use re-reads them rather
// than holding them in registers through the passes (row_topk.cu's register note).
template <typename T, int kBlock>
__device__ __forceinline__ void select_top_k(const T* const& row_logits, int64_t vocab,
                                             float inv_temp, int k, uint64_t* candidates,
                                             int* warp_counts, Bucket* bucket, int* gathered,
                                             int& row_need) {
  uint32_t* hist = reinterpret_cast<uint32_t*>(candidates);
  // ---- 2. radix select
  // Entries to output: k, or fewer when the row has fewer selectable entries.
  const int need = select_digit<kBlock, Digit<0>::kBins>(hist, k, warp_counts, bucket, &row_need);
  if (need <= 0) return;
  const Selection s =
      refine_selection<T, kBlock>(row_logits, vocab, inv_temp, hist, warp_counts, bucket, row_need);

  // ---- 3. gather (the histogram is dead: select_digit's barriers come after its reads)
  // Too many ties at the exact k-th key (shift == 0): take the keys above it here, the lowest-id
  // ties below.
  const bool tied = s.above + s.count > kMaxK;
  const uint32_t lowest = tied ? s.prefix + 1 : s.prefix << s.shift;  // keys <= +inf's: no wrap
  const auto gather = [&](const auto& z, int64_t col0, int64_t stride) {
    constexpr int kSize = Pack<T>::kSize;
#pragma unroll
    for (int m = 0; m < chunk_size<decltype(z)>; ++m) {
      const float x = scaled(z[m], inv_temp);
      const uint32_t key = order_key(x);
      if (selectable(x) && key >= lowest) {
        const int slot = next_slot(gathered);
        const int64_t col = col0 + (m / kSize) * stride + m % kSize;
        if (slot < kMaxK) candidates[slot] = candidate(key, col);  // always: exact counts
      }
    }
  };
  walk_row<T, kBlock>(row_logits, vocab, thread_index(), gather);
  __syncthreads();
  if (tied) {
    gather_ties<T, kBlock>(row_logits, vocab, inv_temp, s.prefix, s.above, row_need - s.above,
                           candidates, warp_counts);
  }

  // ---- 4. sort
  sort_candidates<kBlock>(candidates, tied ? row_need : s.above + s.count);
}

}  // namespace
}  // namespace rlfuse
