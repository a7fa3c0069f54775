// CUDA runtime helpers for the bindings. Safe on machines with no GPU or no driver.

#include <cuda_runtime.h>

#include "rlfuse/cuda_kernels.h"

namespace rlfuse {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it, so it does not surface at a later cudaGetLastError()
    return 0;
  }
  return count;
}

const char* cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace rlfuse
