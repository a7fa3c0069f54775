// Row top-k with the row statistics on the GPU (kernels.h RowTopkArgs: TROLL's sparse support,
// sparse_logprobs).
//
// One block per row, as in row_kernels.cuh. Per row:
//   1. Statistics (read 1, from HBM): row_kernels.cuh's row_stats and target_logit, exactly as
//      token_logprobs_fwd_kernel, so logp, entropy and lse are bitwise the forward's.
//   2. Radix select on the order key of x (below), digits of 11, 11 and 10 bits:
//      a 2048-bin histogram of the top digit in shared memory (read 2), and a block-wide scan of
//      it finds the digit holding the k-th largest key. While the entries in that digit plus all
//      above it are more than kMaxK = 1024, one more histogram pass over the entries that still
//      match the prefix refines the next digit (bits 20..10: read 3, bits 9..0: read 4).
//   3. Gather (one read): every entry with key >= the selected prefix (<= 1024 of them) goes into
//      shared memory at a slot from an integer atomic counter. Slot order is irrelevant: step 4
//      sorts by (key, id), a total order, so the result does not depend on it.
//      Only when the exact k-th key has more ties than fit (all three digits resolved and still
//      > 1024 entries >= it) does the gather take the keys strictly above it; a last ordered pass
//      (block-wide prefix sums in id order, stopping once it has enough) adds the lowest-id ties.
//   4. Bitonic sort of the <= 1024 candidates in shared memory, descending by key then ascending
//      id, padded to a power of two; the first min(k, selectable entries) are written, each value
//      re-read from the row (x of the same multiply as the selection, so -0.0 stays -0.0 where
//      the key folds it into +0.0), and the rest as id -1, value -inf.
// Row reads: 3 when the top digit already narrows the k-th entry to <= 1024 candidates (stats,
// histogram, gather), 4 usually for long rows, 5 at most, plus a partial 6th for the rare tie
// case, plus the k re-read values. Rows are <= ~300 KB, so every read after the first is mostly
// an L2 hit. (Folding the first histogram into the statistics pass would save one L2 read, but
// the statistics loop alone sits at the 64-register cap.)
//
// Order key: x = z * inv_temp in fp32 (one rounded multiply, as the CPU kernels), then the
// order-preserving uint32 of its bits (negatives inverted, positives with the sign bit set), with
// -0.0 folded into +0.0 so that equal values tie and fall back to the lower id. -inf and NaN
// entries never enter the histograms, the gather or the ties (x > -inf filters both).
//
// Determinism: histogram and slot counters are integer atomics on shared memory (exact in any
// order); positions of ties come from prefix sums in id order; the sort is over distinct keys.
// No float atomics. Histogram and candidates share one 8 KB buffer (never live at once).
//
// Registers: row_stats alone uses all 64 for 16-bit types, so per-row values that outlive a pass
// (the row pointer, the output count) live in shared memory and are re-read where used, and
// threadIdx.x is re-read where used, which keeps values derived from it from being held in
// registers across the row loop. Without this, ptxas spills a few bytes on some architectures.

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

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

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>) row_topk_kernel(RowTopkArgs args) {
  constexpr int kWarps = kBlock / kWarpSize;
  __shared__ RowStats warp_stats[kWarps];
  __shared__ int warp_counts[kWarps];
  __shared__ uint64_t candidates[kMaxK];  // the digit histogram until the gather
  __shared__ Bucket bucket;
  __shared__ int gathered;
  // min(k, selectable entries). Read from here where used: kept in a register it would be live
  // (and at the 64-register cap, spilled) through every pass.
  __shared__ int row_need;
  // This row's logits, for the same reason: each pass reads it afresh.
  __shared__ const T* row_logits;
  uint32_t* hist = reinterpret_cast<uint32_t*>(candidates);

  const int64_t vocab = args.vocab;
  const float inv_temp = args.inv_temp;
  const int k = static_cast<int>(args.k);

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {

    // ---- 1. statistics (read 1), then the first digit's histogram (read 2)
    clear<kBlock>(hist, Digit<0>::kBins);
    if (thread_index() == 0) {
      row_logits = row_pointer<T>(args.logits, args.layout, row);
      gathered = 0;
    }
    __syncthreads();
    const RowStats stats = row_stats<T, kBlock>(row_logits, vocab, inv_temp, warp_stats);
    walk_row<T, kBlock>(row_logits, vocab, thread_index(), [&](const auto& z, int64_t, int64_t) {
#pragma unroll
      for (int m = 0; m < chunk_size<decltype(z)>; ++m) {
        const float x = scaled(z[m], inv_temp);
        if (selectable(x)) atomicAdd(&hist[order_key(x) >> Digit<0>::kShift], 1u);
      }
    });
    __syncthreads();
    if (thread_index() == 0) {
      const float x_target = target_logit(row_logits, vocab, args.tokens[row], inv_temp);
      const RowResult result = finalize(stats, x_target);
      args.logp[row] = result.logp;
      args.entropy[row] = result.entropy;
      args.lse[row] = result.lse;
    }

    // ---- 2. radix select
    // Entries to output: k, or fewer when the row has fewer selectable entries.
    const int need =
        select_digit<kBlock, Digit<0>::kBins>(hist, k, warp_counts, &bucket, &row_need);
    if (need > 0) {
      Bucket b = bucket;
      uint32_t prefix = b.digit;
      int shift = Digit<0>::kShift;
      int above = b.above;
      if (above + b.count > kMaxK) {
        clear<kBlock>(hist, Digit<1>::kBins);
        __syncthreads();
        refine_histogram<T, kBlock, 1>(row_logits, vocab, inv_temp, prefix, hist);
        __syncthreads();
        select_digit<kBlock, Digit<1>::kBins>(hist, row_need - above, warp_counts, &bucket,
                                              nullptr);
        b = bucket;
        prefix = (prefix << Digit<1>::kBits) | b.digit;
        shift = Digit<1>::kShift;
        above += b.above;
      }
      if (above + b.count > kMaxK) {
        clear<kBlock>(hist, Digit<2>::kBins);
        __syncthreads();
        refine_histogram<T, kBlock, 2>(row_logits, vocab, inv_temp, prefix, hist);
        __syncthreads();
        select_digit<kBlock, Digit<2>::kBins>(hist, row_need - above, warp_counts, &bucket,
                                              nullptr);
        b = bucket;
        prefix = (prefix << Digit<2>::kBits) | b.digit;
        shift = Digit<2>::kShift;
        above += b.above;
      }

      // ---- 3. gather (the histogram is dead: select_digit's barriers come after its reads)
      // Too many ties at the exact k-th key (shift == 0): take the keys above it here, the
      // lowest-id ties below.
      const bool tied = above + b.count > kMaxK;
      const uint32_t lowest = tied ? prefix + 1 : prefix << shift;  // keys <= +inf's: no wrap
      const auto gather = [&](const auto& z, int64_t col0, int64_t stride) {
        constexpr int kSize = Pack<T>::kSize;
#pragma unroll
        for (int m = 0; m < chunk_size<decltype(z)>; ++m) {
          const float x = scaled(z[m], inv_temp);
          const uint32_t key = order_key(x);
          if (selectable(x) && key >= lowest) {
            const int slot = next_slot(&gathered);
            const int64_t col = col0 + (m / kSize) * stride + m % kSize;
            if (slot < kMaxK) candidates[slot] = candidate(key, col);  // always: exact counts
          }
        }
      };
      walk_row<T, kBlock>(row_logits, vocab, thread_index(), gather);
      __syncthreads();
      if (tied) {
        gather_ties<T, kBlock>(row_logits, vocab, inv_temp, prefix, above, row_need - above,
                               candidates, warp_counts);
      }

      // ---- 4. sort
      sort_candidates<kBlock>(candidates, tied ? row_need : above + b.count);
    }

    int32_t* ids = args.topk_ids + row * args.k;
    float* values = args.topk_values + row * args.k;
    for (int base = 0; base < k; base += kBlock) {
      const int j = base + thread_index();
      if (j >= k) break;
      int32_t id = -1;
      float value = -INFINITY;
      if (j < row_need) {
        id = candidate_id(candidates[j]);
        value = scaled(to_float(row_logits[id]), inv_temp);
      }
      ids[j] = id;
      values[j] = value;
    }
    __syncthreads();  // the next row reuses the shared buffers
  }
}

struct TopkLauncher {
  template <typename T, int kBlock>
  static void launch(const RowTopkArgs& args, unsigned grid, cudaStream_t stream) {
    row_topk_kernel<T, kBlock><<<grid, kBlock, 0, stream>>>(args);
  }
};

}  // namespace

int row_topk_cuda(const RowTopkArgs& args, void* stream) {
  // Candidates live in shared memory; ids and counts are 32-bit.
  if (args.k < 1 || args.k > kMaxK || args.vocab > INT32_MAX) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch<TopkLauncher>(args, stream);
}

}  // namespace rlfuse
