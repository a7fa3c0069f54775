// Row kernel of the CPU fused policy loss: per row, the statistics pass, the token loss
// (token_loss.h), then the gradient pass while the row is still in cache.
#include "cpu_kernels.h"
#include "row_kernels.h"
#include "rlfuse/token_loss.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {

void policy_loss_rows(const PolicyLossFusedArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    char* dst = const_cast<char*>(row_pointer(a.grad_logits, a.dtype, a.grad_layout, row));
    const int64_t y = a.tokens[row];
    const float inv_temp = row_inv_temp(a, row);
    const RowResult r = row_statistics(src, a.dtype, a.vocab, inv_temp, y, buf);
    const TokenLossInputs in{r.logp,           r.entropy,
                             a.old_logp[row],  a.ref_logp != nullptr ? a.ref_logp[row] : 0.0f,
                             a.advantages[row], a.policy_weight[row],
                             a.weight[row]};
    const TokenLoss tl = token_loss(row_params(a, row), in);
    a.loss[row] = tl.loss;
    a.logp[row] = r.logp;
    a.entropy[row] = r.entropy;
    // A masked or fully clipped token (g_logp = g_H = 0) gets a zero row without a re-read.
    row_gradient(src, dst, a.dtype, a.vocab, inv_temp, tl.g_logp, tl.g_entropy, r.entropy, r.lse, y, buf);
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
