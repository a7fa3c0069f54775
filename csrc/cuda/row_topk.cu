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
#include "topk_select.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

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
  // Its fp32(1 / T) (per row with inv_temps), for the same reason.
  __shared__ float row_scale;
  uint32_t* hist = reinterpret_cast<uint32_t*>(candidates);

  const int64_t vocab = args.vocab;
  const int k = static_cast<int>(args.k);

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {

    // ---- 1. statistics (read 1), then the first digit's histogram (read 2)
    clear<kBlock>(hist, Digit<0>::kBins);
    if (thread_index() == 0) {
      row_logits = row_pointer<T>(args.logits, args.layout, row);
      row_scale = row_inv_temp(args, row);
      gathered = 0;
    }
    __syncthreads();
    const float inv_temp = row_scale;
    const RowStats stats = row_stats<T, kBlock>(row_logits, vocab, inv_temp, warp_stats);
    top_digit_histogram<T, kBlock>(row_logits, vocab, inv_temp, hist);
    if (thread_index() == 0) {
      const float x_target = target_logit(row_logits, vocab, args.tokens[row], inv_temp);
      const RowResult result = finalize(stats, x_target);
      args.logp[row] = result.logp;
      args.entropy[row] = result.entropy;
      args.lse[row] = result.lse;
    }

    // ---- 2.-4. radix select, gather and sort (topk_select.cuh)
    select_top_k<T, kBlock>(row_logits, vocab, inv_temp, k, candidates, warp_counts, &bucket,
                            &gathered, row_need);

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
