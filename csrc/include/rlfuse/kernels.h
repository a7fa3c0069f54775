// Torch-free kernel entry points. Every backend honours the same row contract:
//   logits row r lives at  base + row_offset(r, inner, stride_outer, stride_inner)  (elements),
//   its V entries are contiguous; tokens are int64 (out-of-range ids give NaN log-probs and never
//   index memory); all per-row outputs and upstream gradients are contiguous fp32 of length rows.
//
// The argument structs (TokenLogprobsFwdArgs, ..., SampleArgs), RowLayout, DType, the enums and
// TokenLossParams are declared once, in python/rlfuse/_schema.py, and generated into schema.h;
// RLFUSE_KERNELS lists the entry points declared below.
#pragma once

#include <cstdint>

#include "rlfuse/schema.h"

namespace rlfuse {

// CPU (csrc/cpu), multi-threaded over rows: <kernel>_cpu(const <Args>& args, int num_threads).
#define RLFUSE_DECLARE_CPU_ENTRY(kernel, Args) void kernel##_cpu(const Args& args, int num_threads);
RLFUSE_KERNELS(RLFUSE_DECLARE_CPU_ENTRY)
#undef RLFUSE_DECLARE_CPU_ENTRY

// Instruction set the CPU kernels run with on this machine ("avx512", "avx2" or "base").
const char* cpu_isa();

}  // namespace rlfuse
