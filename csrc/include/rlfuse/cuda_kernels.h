// CUDA entry points (csrc/cuda). Torch-free: the stream is passed as an opaque pointer so this
// header can be included by host code compiled without the CUDA toolkit headers.
#pragma once

#include "rlfuse/kernels.h"

namespace rlfuse {

// Each returns a cudaError_t as int (0 = success); launches are asynchronous on `stream`:
// <kernel>_cuda(const <Args>& args, void* stream) for every kernel of RLFUSE_KERNELS (schema.h).
#define RLFUSE_DECLARE_CUDA_ENTRY(kernel, Args) int kernel##_cuda(const Args& args, void* stream);
RLFUSE_KERNELS(RLFUSE_DECLARE_CUDA_ENTRY)
#undef RLFUSE_DECLARE_CUDA_ENTRY

// Runtime helpers for the bindings.
int cuda_device_count();             // 0 when no driver / no device
const char* cuda_error_string(int error);

}  // namespace rlfuse
