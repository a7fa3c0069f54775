// Token log-probs, entropy and their gradient on the GPU (docs/SPEC.md sections 1-2).
//
// The forward is row_kernels.cuh's statistics pass plus the target's logit; the backward is its
// gradient pass with the coefficients of the given upstream gradients. See row_kernels.cuh for the
// row walk, the vectorisation and the exp2 formulation.

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

// kKeptSet: args.kept_min is given (statistics over each row's kept set); without it the kernels
// compile exactly as if the kept set did not exist.
template <typename T, int kBlock, bool kKeptSet>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>)
    token_logprobs_fwd_kernel(TokenLogprobsFwdArgs args) {
  __shared__ RowStats warp_stats[kBlock / kWarpSize];

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const float inv_temp = row_inv_temp(args, row);
    const auto keep = kept_set<kKeptSet>(args.kept_min, row, inv_temp);
    const RowStats stats = row_stats<T, kBlock>(logits, args.vocab, inv_temp, warp_stats, keep);
    if (threadIdx.x == 0) {
      const float x_target = target_logit(logits, args.vocab, args.tokens[row], inv_temp, keep);
      const RowResult result = finalize(stats, x_target);
      args.logp[row] = result.logp;
      args.entropy[row] = result.entropy;
      args.lse[row] = result.lse;
    }
  }
}

template <typename T, int kBlock, bool kKeptSet>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>)
    token_logprobs_bwd_kernel(TokenLogprobsBwdArgs args) {
  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    T* grad = row_pointer<T>(args.grad_logits, args.grad_layout, row);
    const float g_logp = args.grad_logp[row], g_entropy = args.grad_entropy[row];
    if (g_logp == 0.0f && g_entropy == 0.0f) {  // masked row: zeros, logits never read (kernels.h)
      row_zero<T, kBlock>(grad, args.vocab);
      continue;
    }
    const float inv_temp = row_inv_temp(args, row);
    const GradCoeffs coeffs = grad_coeffs(g_logp, g_entropy, args.entropy[row], inv_temp);
    const auto keep = kept_set<kKeptSet>(args.kept_min, row, inv_temp);
    const auto element_grad = kept_grad(ElementGrad(coeffs, args.lse[row], inv_temp), keep);
    row_grad<T, kBlock>(logits, grad, args.vocab, args.tokens[row], element_grad);
  }
}

struct FwdLauncher {
  template <typename T, int kBlock>
  static void launch(const TokenLogprobsFwdArgs& args, unsigned grid, cudaStream_t stream) {
    with_flag(args.kept_min != nullptr, [&](auto has_kept_set) {
      token_logprobs_fwd_kernel<T, kBlock, has_kept_set><<<grid, kBlock, 0, stream>>>(args);
    });
  }
};

struct BwdLauncher {
  template <typename T, int kBlock>
  static void launch(const TokenLogprobsBwdArgs& args, unsigned grid, cudaStream_t stream) {
    with_flag(args.kept_min != nullptr, [&](auto has_kept_set) {
      token_logprobs_bwd_kernel<T, kBlock, has_kept_set><<<grid, kBlock, 0, stream>>>(args);
    });
  }
};

}  // namespace

int token_logprobs_fwd_cuda(const TokenLogprobsFwdArgs& args, void* stream) {
  return dispatch<FwdLauncher>(args, stream);
}

int token_logprobs_bwd_cuda(const TokenLogprobsBwdArgs& args, void* stream) {
  // The kernel writes layout.rows gradient rows.
  if (!valid_layout(args.grad_layout) || args.grad_layout.rows != args.layout.rows) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch<BwdLauncher>(args, stream);
}

}  // namespace rlfuse
