// CPU backend entry points: split rows over threads and run the row kernels built for the best
// instruction set this CPU supports (on x86-64: AVX-512 F/BW/DQ/VL, else AVX2+FMA+F16C, else base).
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"
#include "parallel.h"
#include "rlfuse/kernels.h"

namespace rlfuse {
namespace {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};

Isa best_supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBase;
#else
  return Isa::kBase;
#endif
}

// The best variant this CPU runs, or a lower one named by RLFUSE_CPU_ISA (base, avx2, avx512) to
// test or compare the variants; a name this CPU cannot run falls back to the best one.
Isa selected_isa() {
  static const Isa isa = [] {
    const Isa best = best_supported();
    const char* wanted = std::getenv("RLFUSE_CPU_ISA");
    if (wanted == nullptr) return best;
    for (int i = 0; i <= static_cast<int>(best); ++i) {
      if (std::strcmp(wanted, kIsaNames[i]) == 0) return static_cast<Isa>(i);
    }
    return best;
  }();
  return isa;
}

template <typename Args>
using RowFn = void (*)(const Args&, int64_t, int64_t);

template <typename Args>
void run_rows(const Args& args, int num_threads, RowFn<Args> base, RowFn<Args> avx2, RowFn<Args> avx512) {
  RowFn<Args> rows = base;
  if (selected_isa() == Isa::kAvx512 && avx512 != nullptr) rows = avx512;
  if (selected_isa() == Isa::kAvx2 && avx2 != nullptr) rows = avx2;
  cpu::parallel_for_rows(args.layout.rows, num_threads,
                         [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

}  // namespace

#if defined(__x86_64__)
#define RLFUSE_ROWS(fn) &cpu::base::fn, &cpu::avx2::fn, &cpu::avx512::fn
#else
#define RLFUSE_ROWS(fn) &cpu::base::fn, nullptr, nullptr
#endif

void token_logprobs_fwd_cpu(const TokenLogprobsFwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(forward_rows));
}

void token_logprobs_bwd_cpu(const TokenLogprobsBwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(backward_rows));
}

void policy_loss_fused_cpu(const PolicyLossFusedArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(policy_loss_rows));
}

void kl_div_fwd_cpu(const KlDivFwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(kl_div_fwd_rows));
}

void kl_div_bwd_cpu(const KlDivBwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(kl_div_bwd_rows));
}

void row_topk_cpu(const RowTopkArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(row_topk_rows));
}

void sample_cpu(const SampleArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(sample_rows));
}

void jsd_fwd_cpu(const JsdFwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(jsd_fwd_rows));
}

void jsd_bwd_cpu(const JsdBwdArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(jsd_bwd_rows));
}

void troll_cpu(const TrollArgs& args, int num_threads) {
  run_rows(args, num_threads, RLFUSE_ROWS(troll_rows));
}

const char* cpu_isa() { return kIsaNames[static_cast<int>(selected_isa())]; }

}  // namespace rlfuse
