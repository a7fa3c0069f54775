// CUDA entry points (csrc/cuda). Torch-free: the stream is passed as an opaque pointer so this
// header can be included by host code compiled without the CUDA toolkit headers.
#pragma once

#include "rlfuse/kernels.h"

namespace rlfuse {

// Each returns a cudaError_t as int (0 = success); launches are asynchronous on `stream`.
int token_logprobs_fwd_cuda(const TokenLogprobsFwdArgs& args, void* stream);
int token_logprobs_bwd_cuda(const TokenLogprobsBwdArgs& args, void* stream);
int policy_loss_fused_cuda(const PolicyLossFusedArgs& args, void* stream);
int kl_div_fwd_cuda(const KlDivFwdArgs& args, void* stream);
int row_topk_cuda(const RowTopkArgs& args, void* stream);
int sample_cuda(const SampleArgs& args, void* stream);
int kl_div_bwd_cuda(const KlDivBwdArgs& args, void* stream);

// Runtime helpers for the bindings.
int cuda_device_count();             // 0 when no driver / no device
const char* cuda_error_string(int error);

}  // namespace rlfuse
