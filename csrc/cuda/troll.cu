// Fused TROLL on the GPU (schema.h TrollArgs, docs/SPEC.md section 7), the CUDA port of
// csrc/cpu/troll_rows.cpp. One block per row (blocks loop over rows past kMaxGrid), per row:
//   1. Statistics (read 1): row_kernels.cuh's row_stats, as every row kernel, so logp, entropy and
//      lse are the forward's; then the new policy's top-K exactly as row_topk.cu (radix select on
//      the order key of x = z * inv_temp, gather of <= 1024 candidates into shared memory, bitonic
//      sort descending by value then ascending id): topk_select.cuh, shared with row_topk.cu.
//   2. The support, as the CPU kernel: y (b = old_logp), the old kept ids (b = the stored
//      old log-probs), the new kept ids (the sorted top entries while the mass before them is
//      < 1 - threshold; b = kTrollLogFloor); an id that appears twice keeps its first (priority)
//      copy. Each candidate is one 64-bit key (id << 32 | priority), complemented so that
//      row_topk's descending bitonic sort orders them by id, then priority; thread 0 drops the
//      repeats while compacting them into the support arrays (sorted by id, as the CPU's).
//   3. troll_math.h's troll_on_support in float64 by thread 0 on the shared-memory arrays (dynamic
//      shared memory: 1 + old_k + k entries), then the penalties (token_loss, as the CPU kernel),
//      the per-token outputs and the sparse gradient of each support entry (x policy weight / T).
//   4. The gradient row: zeros (no penalty gradient) or row_kernels.cuh's dense row gradient, a
//      barrier, then every support entry rewritten as its dense part (recomputed from the raw logit
//      kept in shared memory) plus its sparse part. In-place safe: every read of the row precedes
//      the gradient pass, and within it each element is read by the thread that writes it.
// A masked token (policy_weight = weight = 0) gets its statistics, zero TROLL outputs and a zero
// row, without a top-k.
//
// Registers: the float64 projection in one thread needs more than the 64 registers the streaming
// kernels are held to, so this kernel is compiled for one block per SM minimum (kBlock threads).

#include "row_kernels.cuh"
#include "topk_select.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"
#include "rlfuse/token_loss.h"
#include "rlfuse/troll_math.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

// ---- the TROLL kernel ---------------------------------------------------------------------------

// Shared-memory layout of one row's support (dynamic shared memory), for cap = 1 + old_k + k
// entries: the candidate keys (a power of two >= cap, for the sort), the five float64 arrays of
// troll_on_support, the support ids and the raw logits of the support entries.
struct SupportLayout {
  int cap;
  int keys;  // power of two >= cap

  __host__ __device__ static int pow2_at_least(int n) {
    int size = 1;
    while (size < n) size *= 2;
    return size;
  }
  __host__ __device__ explicit SupportLayout(int capacity)
      : cap(capacity), keys(pow2_at_least(capacity)) {}
  __host__ __device__ size_t bytes() const {
    return static_cast<size_t>(keys) * sizeof(uint64_t) + 5 * static_cast<size_t>(cap) * sizeof(double) +
           static_cast<size_t>(cap) * (sizeof(int32_t) + sizeof(float));
  }
};

// What thread 0 hands the block after the support math.
struct TrollRowState {
  float g_logp;   // penalty gradients (0, 0: the row's dense part is zero)
  float g_entropy;
  float entropy;
  float lse;
  int support;    // entries of the support
};

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, 1) troll_kernel(TrollArgs args) {
  constexpr int kWarps = kBlock / kWarpSize;
  __shared__ RowStats warp_stats[kWarps];
  __shared__ int warp_counts[kWarps];
  __shared__ uint64_t candidates[kMaxK];  // the digit histogram until the gather
  __shared__ Bucket bucket;
  __shared__ int gathered;
  __shared__ int row_need;
  __shared__ int row_new;    // new kept ids (a prefix of the sorted top entries)
  __shared__ float row_lse;
  __shared__ RowResult row_result;
  __shared__ const T* row_logits;
  __shared__ float row_scale;  // the row's fp32(1 / T) (per row with inv_temps)
  __shared__ TrollRowState state;
  extern __shared__ __align__(16) unsigned char support_memory[];
  uint32_t* hist = reinterpret_cast<uint32_t*>(candidates);

  const SupportLayout layout(static_cast<int>(1 + args.old_k + args.k));
  uint64_t* keys = reinterpret_cast<uint64_t*>(support_memory);
  double* sa = reinterpret_cast<double*>(keys + layout.keys);
  double* sb = sa + layout.cap;
  double* slq = sb + layout.cap;
  double* sg = slq + layout.cap;
  double* sea = sg + layout.cap;
  int32_t* sids = reinterpret_cast<int32_t*>(sea + layout.cap);
  float* sz = reinterpret_cast<float*>(sids + layout.cap);

  const int64_t vocab = args.vocab;
  const int k = static_cast<int>(args.k);
  const int old_k = static_cast<int>(args.old_k);

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    // Uniform over the block: every thread reads the same two weights.
    const bool masked = args.policy_weight[row] == 0.0f && args.weight[row] == 0.0f;

    // ---- 1. statistics (read 1), then the first digit's histogram (read 2)
    if (!masked) clear<kBlock>(hist, Digit<0>::kBins);
    if (thread_index() == 0) {
      row_logits = row_pointer<T>(args.logits, args.layout, row);
      row_scale = row_inv_temp(args, row);
      gathered = 0;
    }
    __syncthreads();
    const float inv_temp = row_scale;
    const RowStats stats = row_stats<T, kBlock>(row_logits, vocab, inv_temp, warp_stats);
    if (thread_index() == 0) {
      const float x_target = target_logit(row_logits, vocab, args.tokens[row], inv_temp);
      const RowResult result = finalize(stats, x_target);
      row_result = result;
      row_lse = result.lse;
      args.logp[row] = result.logp;
      args.entropy[row] = result.entropy;
      if (masked) {
        args.loss[row] = 0.0f;
        args.eta[row] = 0.0f;
        args.kl_before[row] = 0.0f;
        args.kl_after[row] = 0.0f;
        args.support[row] = 0.0f;
      }
    }
    if (masked) {
      T* grad = row_pointer<T>(args.grad_logits, args.grad_layout, row);
      __syncthreads();  // every read of the row (thread 0's target logit) before the first store
      row_zero<T, kBlock>(grad, vocab);
      __syncthreads();  // the next row reuses row_logits
      continue;
    }
    top_digit_histogram<T, kBlock>(row_logits, vocab, inv_temp, hist);

    // ---- 2. radix select, gather and sort of the top k (topk_select.cuh, as row_topk.cu)
    select_top_k<T, kBlock>(row_logits, vocab, inv_temp, k, candidates, warp_counts, &bucket,
                            &gathered, row_need);

    // ---- 3. the support. New kept ids: the sorted top entries while the mass before them is
    // < 1 - threshold (thread 0, in order, float64 as the CPU kernel).
    if (thread_index() == 0) {
      const double keep_below = 1.0 - args.threshold;
      const double lse = static_cast<double>(row_lse);
      double cumulative = 0.0;
      int kept = 0;
      for (; kept < row_need; ++kept) {
        if (!(cumulative < keep_below)) break;
        const int32_t id = candidate_id(candidates[kept]);
        const float x = scaled(to_float(row_logits[id]), inv_temp);
        cumulative += exp(static_cast<double>(x) - lse);
      }
      row_new = kept;
    }
    __syncthreads();
    // Candidates in priority order p: y (p = 0), the old slots (1 + slot), the new kept (1 + old_k
    // + rank); key ~(id << 32 | p), 0 for an id outside the row. Raw logit and raw b by priority.
    const int count = 1 + old_k + row_new;
    for (int p = thread_index(); p < count; p += kBlock) {
      int64_t id;
      double b_raw;
      if (p == 0) {
        id = args.tokens[row];
        b_raw = args.old_logp[row];
      } else if (p <= old_k) {
        id = args.old_ids[row * args.old_k + (p - 1)];
        b_raw = args.old_logprobs[row * args.old_k + (p - 1)];
      } else {
        id = candidate_id(candidates[p - 1 - old_k]);
        b_raw = kTrollLogFloor;
      }
      const bool valid = id >= 0 && id < vocab;
      keys[p] = valid ? ~((static_cast<uint64_t>(id) << 32) | static_cast<uint32_t>(p)) : uint64_t{0};
      slq[p] = valid ? static_cast<double>(to_float(row_logits[id])) : 0.0;
      sg[p] = b_raw;
    }
    sort_candidates<kBlock>(keys, count);  // by id, then priority; invalid entries (0) last

    if (thread_index() == 0) {
      // Compaction: the first (priority) copy of each id, in id order.
      const int64_t y = args.tokens[row];
      int n = 0;
      int ty = -1;
      int64_t last = -1;
      for (int i = 0; i < count; ++i) {
        const uint64_t c = keys[i];
        if (c == 0) break;
        const uint64_t key = ~c;
        const int64_t id = static_cast<int64_t>(key >> 32);
        if (id == last) continue;
        last = id;
        const int p = static_cast<int>(key & 0xffffffffu);
        const float z = static_cast<float>(slq[p]);
        sz[n] = z;
        sids[n] = static_cast<int32_t>(id);
        sa[n] = static_cast<double>(scaled(z, inv_temp));
        sb[n] = sg[p];
        if (id == y) ty = n;
        ++n;
      }
      const float policy_weight = args.policy_weight[row];
      const float weight = args.weight[row];
      const TrollSupportResult t =
          troll_on_support(n, sa, sb, slq, sg, sea, ty, args.advantages[row], args.eps, args.alpha);
      const RowResult result = row_result;
      const TokenLossInputs in{result.logp, result.entropy, 0.0f,
                               args.ref_logp != nullptr ? args.ref_logp[row] : 0.0f, 0.0f, 0.0f, weight};
      const TokenLoss pen = token_loss(args.params, in);
      args.loss[row] = (policy_weight != 0.0f ? policy_weight * static_cast<float>(t.loss) : 0.0f) + pen.loss;
      args.eta[row] = static_cast<float>(t.eta);
      args.kl_before[row] = static_cast<float>(t.kl_before);
      args.kl_after[row] = static_cast<float>(t.kl_after);
      args.support[row] = static_cast<float>(n);
      const double scale = static_cast<double>(policy_weight) * inv_temp;
      for (int j = 0; j < n; ++j) {
        sg[j] = policy_weight != 0.0f ? static_cast<double>(static_cast<float>(scale * sg[j])) : 0.0;
      }
      state = TrollRowState{pen.g_logp, pen.g_entropy, result.entropy, result.lse, n};
    }
    // Publishes the support and `state`; every read of the row is done (dst may alias it).
    __syncthreads();

    // ---- 4. the gradient row
    {
      T* grad = row_pointer<T>(args.grad_logits, args.grad_layout, row);
      const TrollRowState st = state;
      const int64_t y = args.tokens[row];
      const bool dense = !(st.g_logp == 0.0f && st.g_entropy == 0.0f);
      const GradCoeffs coeffs = grad_coeffs(st.g_logp, st.g_entropy, st.entropy, inv_temp);
      const ElementGrad element_grad(coeffs, st.lse, inv_temp);
      if (dense) {
        row_grad<T, kBlock>(row_logits, grad, vocab, y, element_grad);
      } else {
        row_zero<T, kBlock>(grad, vocab);
      }
      __syncthreads();  // the support entries after the row's own stores
      for (int j = thread_index(); j < st.support; j += kBlock) {
        const int32_t id = sids[j];
        const float sparse = static_cast<float>(sg[j]);
        const float base = dense ? element_grad(sz[j], id == y) : 0.0f;
        grad[id] = from_float<T>(__fadd_rn(base, sparse));
      }
    }
    __syncthreads();  // the next row reuses the shared buffers
  }
}

struct TrollLauncher {
  template <typename T, int kBlock>
  static void launch(const TrollArgs& args, unsigned grid, cudaStream_t stream) {
    const SupportLayout layout(static_cast<int>(1 + args.old_k + args.k));
    const size_t bytes = layout.bytes();
    if (bytes > 48 * 1024 &&
        cudaFuncSetAttribute(troll_kernel<T, kBlock>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) != cudaSuccess) {
      return;  // the error stays for dispatch's cudaGetLastError
    }
    troll_kernel<T, kBlock><<<grid, kBlock, bytes, stream>>>(args);
  }
};

}  // namespace

int troll_cuda(const TrollArgs& args, void* stream) {
  // The top-k candidates live in shared memory (k <= 1024, as row_topk); ids and counts are
  // 32-bit; the support (1 + old_k + k entries) in dynamic shared memory.
  if (args.k < 1 || args.k > kMaxK || args.old_k < 0 || args.old_k > kMaxK || args.vocab > INT32_MAX) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (!valid_layout(args.grad_layout) || args.grad_layout.rows != args.layout.rows) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool kl_on = args.params.kl != kKlNone && args.params.kl_coef != 0.0f;
  if (kl_on && args.ref_logp == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch<TrollLauncher>(args, stream);
}

}  // namespace rlfuse
