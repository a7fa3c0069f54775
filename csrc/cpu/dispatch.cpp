// CPU backend entry points: split rows over threads and run the row kernels built for the best
// instruction set this CPU supports (AVX2+FMA+F16C on x86-64 where present).
#include "cpu_kernels.h"
#include "parallel.h"
#include "rlfuse/kernels.h"

namespace rlfuse {
namespace {

bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

template <typename Args>
void run_rows(const Args& args, int num_threads, void (*base)(const Args&, int64_t, int64_t),
              void (*avx2)(const Args&, int64_t, int64_t)) {
  const auto rows = avx2 != nullptr && use_avx2() ? avx2 : base;
  cpu::parallel_for_rows(args.layout.rows, num_threads,
                         [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

}  // namespace

#if defined(__x86_64__)
#define RLFUSE_AVX2_ROWS(fn) &cpu::avx2::fn
#else
#define RLFUSE_AVX2_ROWS(fn) nullptr
#endif

void token_logprobs_fwd_cpu(const TokenLogprobsFwdArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::forward_rows, RLFUSE_AVX2_ROWS(forward_rows));
}

void token_logprobs_bwd_cpu(const TokenLogprobsBwdArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::backward_rows, RLFUSE_AVX2_ROWS(backward_rows));
}

void policy_loss_fused_cpu(const PolicyLossFusedArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::policy_loss_rows, RLFUSE_AVX2_ROWS(policy_loss_rows));
}

void kl_div_fwd_cpu(const KlDivFwdArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::kl_div_fwd_rows, RLFUSE_AVX2_ROWS(kl_div_fwd_rows));
}

void kl_div_bwd_cpu(const KlDivBwdArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::kl_div_bwd_rows, RLFUSE_AVX2_ROWS(kl_div_bwd_rows));
}

void row_topk_cpu(const RowTopkArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::row_topk_rows, RLFUSE_AVX2_ROWS(row_topk_rows));
}

void sample_cpu(const SampleArgs& args, int num_threads) {
  run_rows(args, num_threads, &cpu::base::sample_rows, RLFUSE_AVX2_ROWS(sample_rows));
}

const char* cpu_isa() { return use_avx2() ? "avx2" : "base"; }

}  // namespace rlfuse
