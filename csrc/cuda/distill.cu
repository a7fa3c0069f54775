// Generalised Jensen-Shannon divergence between two logit rows on the GPU (schema.h JsdFwdArgs /
// JsdBwdArgs, docs/distillation.md): p = softmax(x) (logits), q = softmax(y) (other),
// m = (1 - beta) p + beta q, JSD = beta KL(q || m) + (1 - beta) KL(p || m).
//
// One block per row pair, as in row_kernels.cuh. Forward: row_kernels' statistics pass over each
// row (the same code for both, so identical rows give identical statistics), then one walk of the
// pair that sums p u and q v (u = log(m / p), v = log(m / q)) per thread, merged by the
// fixed-order block_reduce. Backward: one more walk of the pair, writing the requested gradients.
// No atomics: results are bitwise reproducible.
//
// Per element, with d = log q - log p: w = (1 - beta) + beta e^d (d <= 0) or beta + (1 - beta) e^-d
// (d > 0), r = log w; u = r, v = r - d (d <= 0) or u = r + d, v = r. The exponential only sees
// -|d| and the logarithm a value in [min(beta, 1 - beta), 1]; d = 0 gives w = 1 and u = v = 0
// exactly. Terms with p = 0 (resp. q = 0) add nothing and get a zero gradient, whatever d is.
//
// These kernels have been compiled (tests/test_nvcc_build.py) but not yet run on a GPU: the
// Triton kernels lead for CUDA tensors (backends.py) until a GPU round validates them.

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

constexpr int kPairLoads = 1;    // 16-byte loads per row in flight: the mixture math is register-heavy
constexpr int kScalarChunk = 4;  // scalar fallback: elements per row loaded before use
// Half the one-row kernels' resident blocks (up to 128 registers): the mixture's per-element
// logarithm and both rows' values do not fit 64 registers without spilling.
template <int kBlock>
constexpr int kJsdMinBlocks = kMinBlocks<kBlock> / 2 > 0 ? kMinBlocks<kBlock> / 2 : 1;

// u = log(m / p), v = log(m / q) of one element pair from log p and log q.
struct MixtureLogs {
  float u;
  float v;
};

__device__ __forceinline__ MixtureLogs mixture_logs(float log_p, float log_q, float beta) {
  const float d = __fsub_rn(log_q, log_p);
  const bool below = d <= 0.0f;
  const float e = fast_exp2(-fabsf(d) * kLog2e);  // in [0, 1]; NaN d is selected away by the caller
  const float w = below ? fmaf(beta, e, 1.0f - beta) : fmaf(1.0f - beta, e, beta);
  const float r = __logf(w);  // w in [min(beta, 1 - beta), 1]; exactly 0 at w = 1
  return MixtureLogs{below ? r : __fadd_rn(r, d), below ? __fsub_rn(r, d) : r};
}

// Per-thread sums of p u and q v (merged by block_reduce in a fixed order).
struct MixtureSums {
  float pu;
  float qv;
};

struct MixtureSumsMerge {
  static __device__ __forceinline__ MixtureSums identity() { return MixtureSums{0.0f, 0.0f}; }
  static __device__ __forceinline__ MixtureSums merge(const MixtureSums& a, const MixtureSums& b) {
    return MixtureSums{__fadd_rn(a.pu, b.pu), __fadd_rn(a.qv, b.qv)};
  }
};

// The row pair's element-wise quantities from x = z / T and y = w / T.
struct PairElement {
  float inv_temp;
  float lse_p;
  float lse_q;
  float beta;

  __device__ __forceinline__ float log_p(float z) const { return fmaf(z, inv_temp, -lse_p); }
  __device__ __forceinline__ float log_q(float w) const { return fmaf(w, inv_temp, -lse_q); }
};

// Visits every element pair of two rows (same length) by the whole block: 16-byte vectors when
// both rows share a 16-byte phase (walk_rows), else scalar, coalesced, kScalarChunk elements of
// each row loaded before use. visit(z, w, col) per element.
template <typename T, int kBlock, typename Visit>
__device__ __forceinline__ void walk_pair(const T* logits, const T* other, int64_t vocab, Visit&& visit) {
  const int tid = threadIdx.x;
  const uintptr_t phase = reinterpret_cast<uintptr_t>(logits) ^ reinterpret_cast<uintptr_t>(other);
  if (phase % kVecBytes != 0) {
    int64_t col = tid;
    for (; col + (kScalarChunk - 1) * kBlock < vocab; col += kScalarChunk * kBlock) {
      float z[kScalarChunk];
      float w[kScalarChunk];
#pragma unroll
      for (int u = 0; u < kScalarChunk; ++u) {
        z[u] = to_float(logits[col + u * kBlock]);
        w[u] = to_float(other[col + u * kBlock]);
      }
#pragma unroll
      for (int u = 0; u < kScalarChunk; ++u) visit(z[u], w[u], col + u * kBlock);
    }
    for (; col < vocab; col += kBlock) visit(to_float(logits[col]), to_float(other[col]), col);
    return;
  }
  constexpr int kSize = Pack<T>::kSize;
  const T* const rows[2] = {logits, other};
  walk_rows<T, kBlock, kPairLoads>(rows, vocab, tid, [&](const auto& z, int64_t col0, int64_t stride) {
    constexpr int kN = chunk_size<decltype(z[0])>;
#pragma unroll
    for (int m = 0; m < kN; ++m) visit(z[0][m], z[1][m], col0 + (m / kSize) * stride + m % kSize);
  });
}

template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, kJsdMinBlocks<kBlock>) jsd_fwd_kernel(JsdFwdArgs args) {
  __shared__ RowStats warp_stats[kBlock / kWarpSize];
  __shared__ MixtureSums warp_sums[kBlock / kWarpSize];
  __shared__ float row_lse[2];

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const T* other = row_pointer<T>(args.other, args.other_layout, row);
    const float inv_temp = row_inv_temp(args, row);
    // Read 1: the statistics of each row (valid in thread 0, broadcast through shared memory).
    const RowStats p = row_stats<T, kBlock>(logits, args.vocab, inv_temp, warp_stats);
    const RowStats q = row_stats<T, kBlock>(other, args.vocab, inv_temp, warp_stats);
    if (threadIdx.x == 0) {
      row_lse[0] = p.max + logf(p.sum);
      row_lse[1] = q.max + logf(q.sum);
    }
    __syncthreads();
    const PairElement element{inv_temp, row_lse[0], row_lse[1], args.beta};
    // Read 2: the mixture sums.
    MixtureSums sums = MixtureSumsMerge::identity();
    walk_pair<T, kBlock>(logits, other, args.vocab, [&](float z, float w, int64_t) {
      const float log_p = element.log_p(z);
      const float log_q = element.log_q(w);
      const float pv = fast_exp2(log_p * kLog2e);
      const float qv = fast_exp2(log_q * kLog2e);
      const MixtureLogs m = mixture_logs(log_p, log_q, args.beta);
      sums.pu = pv == 0.0f ? sums.pu : fmaf(pv, m.u, sums.pu);
      sums.qv = qv == 0.0f ? sums.qv : fmaf(qv, m.v, sums.qv);
    });
    const MixtureSums total = block_reduce<kBlock, MixtureSumsMerge>(sums, warp_sums);
    if (threadIdx.x == 0) {
      const float kl_p = -total.pu;
      const float kl_q = -total.qv;
      args.kl_logits[row] = kl_p;
      args.kl_other[row] = kl_q;
      args.jsd[row] = args.beta * kl_q + (1.0f - args.beta) * kl_p;
      args.lse[row] = row_lse[0];
      args.other_lse[row] = row_lse[1];
    }
    __syncthreads();  // row_lse is rewritten by the next row
  }
}

template <typename T, int kBlock, bool kGradP, bool kGradQ>
__global__ void __launch_bounds__(kBlock, kJsdMinBlocks<kBlock>) jsd_bwd_kernel(JsdBwdArgs args) {
  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    T* grad_p = nullptr;
    T* grad_q = nullptr;
    if constexpr (kGradP) grad_p = row_pointer<T>(args.grad_logits, args.grad_layout, row);
    if constexpr (kGradQ) grad_q = row_pointer<T>(args.grad_other, args.grad_other_layout, row);
    const float inv_temp = row_inv_temp(args, row);
    const float g = args.grad_jsd[row] * inv_temp;  // the same for the whole block
    if (g == 0.0f) {
      if constexpr (kGradP) row_zero<T, kBlock>(grad_p, args.vocab);
      if constexpr (kGradQ) row_zero<T, kBlock>(grad_q, args.vocab);
      continue;
    }
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const T* other = row_pointer<T>(args.other, args.other_layout, row);
    const PairElement element{inv_temp, args.lse[row], args.other_lse[row], args.beta};
    const float kl_p = args.kl_logits[row];
    const float kl_q = args.kl_other[row];
    const float coef_p = -(1.0f - args.beta) * g;
    const float coef_q = -args.beta * g;
    // Each element pair is loaded by the thread that writes its gradients, before it writes them.
    walk_pair<T, kBlock>(logits, other, args.vocab, [&](float z, float w, int64_t col) {
      const float log_p = element.log_p(z);
      const float log_q = element.log_q(w);
      const float pv = fast_exp2(log_p * kLog2e);
      const float qv = fast_exp2(log_q * kLog2e);
      const MixtureLogs m = mixture_logs(log_p, log_q, args.beta);
      if constexpr (kGradP) {
        grad_p[col] = from_float<T>(pv == 0.0f ? 0.0f : coef_p * (pv * __fadd_rn(m.u, kl_p)));
      }
      if constexpr (kGradQ) {
        grad_q[col] = from_float<T>(qv == 0.0f ? 0.0f : coef_q * (qv * __fadd_rn(m.v, kl_q)));
      }
    });
  }
}

struct FwdLauncher {
  template <typename T, int kBlock>
  static void launch(const JsdFwdArgs& args, unsigned grid, cudaStream_t stream) {
    jsd_fwd_kernel<T, kBlock><<<grid, kBlock, 0, stream>>>(args);
  }
};

struct BwdLauncher {
  template <typename T, int kBlock>
  static void launch(const JsdBwdArgs& args, unsigned grid, cudaStream_t stream) {
    with_requested_grads(args, [&](auto grad_p, auto grad_q) {
      jsd_bwd_kernel<T, kBlock, grad_p, grad_q><<<grid, kBlock, 0, stream>>>(args);
    });
  }
};

bool valid_beta(float beta) { return beta > 0.0f && beta < 1.0f; }

}  // namespace

int jsd_fwd_cuda(const JsdFwdArgs& args, void* stream) {
  if (!valid_beta(args.beta) || !same_rows(args.layout, args.other_layout)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch<FwdLauncher>(args, stream);
}

int jsd_bwd_cuda(const JsdBwdArgs& args, void* stream) {
  if (!valid_beta(args.beta)) return static_cast<int>(cudaErrorInvalidValue);
  return launch_pair_backward(args, [&] { return dispatch<BwdLauncher>(args, stream); });
}

}  // namespace rlfuse
