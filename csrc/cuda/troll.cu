// Fused TROLL on the GPU (schema.h TrollArgs): not implemented yet; the Python layer routes CUDA
// tensors to the PyTorch composition (python/rlfuse/troll.py) until it is.
#include <cuda_runtime.h>

#include "rlfuse/cuda_kernels.h"

namespace rlfuse {

int troll_cuda(const TrollArgs& args, void* stream) {
  (void)args;
  (void)stream;
  return static_cast<int>(cudaErrorNotSupported);
}

}  // namespace rlfuse
