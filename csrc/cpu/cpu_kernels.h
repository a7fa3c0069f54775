// Row-range kernels of the CPU backend, built once per instruction set (see CMakeLists.txt).
#pragma once

#include <cstdint>

#include "rlfuse/kernels.h"

namespace rlfuse::cpu {

#define RLFUSE_DECLARE_ROW_KERNELS(isa)                                                \
  namespace isa {                                                                      \
  void forward_rows(const TokenLogprobsFwdArgs& args, int64_t begin, int64_t end);   \
  void backward_rows(const TokenLogprobsBwdArgs& args, int64_t begin, int64_t end);  \
  void policy_loss_rows(const PolicyLossFusedArgs& args, int64_t begin, int64_t end); \
  void kl_div_fwd_rows(const KlDivFwdArgs& args, int64_t begin, int64_t end);         \
  void kl_div_bwd_rows(const KlDivBwdArgs& args, int64_t begin, int64_t end);         \
  void row_topk_rows(const RowTopkArgs& args, int64_t begin, int64_t end);             \
  void sample_rows(const SampleArgs& args, int64_t begin, int64_t end);                \
  void jsd_fwd_rows(const JsdFwdArgs& args, int64_t begin, int64_t end);               \
  void jsd_bwd_rows(const JsdBwdArgs& args, int64_t begin, int64_t end);               \
  void troll_rows(const TrollArgs& args, int64_t begin, int64_t end);                  \
  }

RLFUSE_DECLARE_ROW_KERNELS(base)
#if defined(__x86_64__)
RLFUSE_DECLARE_ROW_KERNELS(avx2)
RLFUSE_DECLARE_ROW_KERNELS(avx512)
#endif

}  // namespace rlfuse::cpu
