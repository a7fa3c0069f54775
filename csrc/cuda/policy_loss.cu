// Fused token-level policy loss on the GPU (docs/ARCHITECTURE.md "The two paths for a loss", fused path;
// docs/SPEC.md sections 1-3 and 5).
//
// One block per row, one kernel: row_kernels.cuh's statistics pass (lse, H, logp), token_loss()
// from token_loss.h in thread 0, then row_kernels.cuh's gradient pass over the same row, which a
// GPU likely still holds in L2: ~4 bytes per element instead of the general path's 6. Thread 0
// hands g_logp, g_H, H and lse to the block through shared memory and every thread derives the
// coefficients exactly as token_logprobs_bwd_kernel does, so for the same upstream gradients the
// fused gradient is bitwise the general path's.
//
// A row whose loss has no gradient (g_logp = g_H = 0: a masked token, a zero weight) stores zeros
// without re-reading the row: cheaper, and garbage logits in masked rows cannot leak NaN into the
// gradient. Every gradient element is written either way: the buffer may be uninitialised or hold
// the logits (in-place, `grad_logits == logits`).

#include "row_kernels.cuh"

#include "rlfuse/cuda_kernels.h"
#include "rlfuse/row_math.h"
#include "rlfuse/token_loss.h"

namespace rlfuse {
namespace {

using namespace row_kernels;  // NOLINT(build/namespaces): this file's own building blocks

// What thread 0 hands the block for the gradient pass.
struct RowLossGrad {
  float g_logp;
  float g_entropy;
  float entropy;
  float lse;
};

// `logits` and `grad_logits` may alias (in-place): every load of a row (both passes, and thread
// 0's read of the target logit) happens before the barrier that precedes the row's first store,
// and within the gradient pass each element is read by the thread that writes it.
template <typename T, int kBlock>
__global__ void __launch_bounds__(kBlock, kMinBlocks<kBlock>)
    policy_loss_fused_kernel(PolicyLossFusedArgs args) {
  __shared__ RowStats warp_stats[kBlock / kWarpSize];
  __shared__ RowLossGrad row_loss;

  const int64_t vocab = args.vocab;

  for (int64_t row = blockIdx.x; row < args.layout.rows; row += gridDim.x) {
    const T* logits = row_pointer<T>(args.logits, args.layout, row);
    const float inv_temp = row_inv_temp(args, row);
    T* grad = row_pointer<T>(args.grad_logits, args.grad_layout, row);
    const int64_t target = args.tokens[row];  // loaded here, its latency hides behind the pass

    const RowStats stats = row_stats<T, kBlock>(logits, vocab, inv_temp, warp_stats);
    if (threadIdx.x == 0) {
      // All loads first, so they overlap; ref_logp is only read when given.
      TokenLossInputs inputs;
      inputs.old_logp = args.old_logp[row];
      inputs.ref_logp = args.ref_logp != nullptr ? args.ref_logp[row] : 0.0f;
      inputs.advantage = args.advantages[row];
      inputs.policy_weight = args.policy_weight[row];
      inputs.weight = args.weight[row];
      const RowResult result = finalize(stats, target_logit(logits, vocab, target, inv_temp));
      inputs.logp = result.logp;
      inputs.entropy = result.entropy;
      const TokenLoss token = token_loss(row_params(args, row), inputs);
      args.loss[row] = token.loss;
      args.logp[row] = result.logp;
      args.entropy[row] = result.entropy;
      row_loss = RowLossGrad{token.g_logp, token.g_entropy, result.entropy, result.lse};
    }
    // Publishes row_loss. Thread 0 rewrites it only after the next row's reduction barriers,
    // which every thread reaches after it is done with this row.
    __syncthreads();
    const RowLossGrad loss_grad = row_loss;

    if (loss_grad.g_logp == 0.0f && loss_grad.g_entropy == 0.0f) {
      row_zero<T, kBlock>(grad, vocab);
    } else {
      const GradCoeffs coeffs =
          grad_coeffs(loss_grad.g_logp, loss_grad.g_entropy, loss_grad.entropy, inv_temp);
      const ElementGrad element_grad(coeffs, loss_grad.lse, inv_temp);
      row_grad<T, kBlock>(logits, grad, vocab, target, element_grad);
    }
  }
}

struct FusedLauncher {
  template <typename T, int kBlock>
  static void launch(const PolicyLossFusedArgs& args, unsigned grid, cudaStream_t stream) {
    policy_loss_fused_kernel<T, kBlock><<<grid, kBlock, 0, stream>>>(args);
  }
};

}  // namespace

int policy_loss_fused_cuda(const PolicyLossFusedArgs& args, void* stream) {
  // The kernel writes layout.rows gradient rows.
  if (!valid_layout(args.grad_layout) || args.grad_layout.rows != args.layout.rows) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // ref_logp may be null only when no KL term reads it (the kernel then passes 0).
  const bool kl_on = args.params.kl != kKlNone && args.params.kl_coef != 0.0f;
  if (kl_on && args.ref_logp == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch<FusedLauncher>(args, stream);
}

}  // namespace rlfuse
