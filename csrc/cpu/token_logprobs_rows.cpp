// Row kernels of the CPU token_logprobs backend (docs/SPEC.md sections 1-2): one pass over each row
// forward, one read + one write backward. Compiled once per instruction set: RLFUSE_CPU_ISA
// names the namespace (see CMakeLists.txt and token_logprobs.cpp, which dispatches).
#include "cpu_kernels.h"
#include "row_kernels.h"

namespace rlfuse::cpu::RLFUSE_CPU_ISA {

void forward_rows(const TokenLogprobsFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    const RowResult r = row_statistics(src, a.dtype, a.vocab, row_inv_temp(a, row), a.tokens[row], buf,
                                       NoChunkVisit{}, row_kept_min(a, row));
    a.logp[row] = r.logp;
    a.entropy[row] = r.entropy;
    a.lse[row] = r.lse;
  }
}

void backward_rows(const TokenLogprobsBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const char* src = row_pointer(a.logits, a.dtype, a.layout, row);
    char* dst = const_cast<char*>(row_pointer(a.grad_logits, a.dtype, a.grad_layout, row));
    row_gradient(src, dst, a.dtype, a.vocab, row_inv_temp(a, row), a.grad_logp[row], a.grad_entropy[row],
                 a.entropy[row], a.lse[row], a.tokens[row], buf, row_kept_min(a, row));
  }
}

}  // namespace rlfuse::cpu::RLFUSE_CPU_ISA
