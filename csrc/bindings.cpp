// The single pybind11 module rlfuse._C. Torch-free: tensors arrive as data pointers (ints),
// sizes and strides, already validated by the Python layer (python/rlfuse/ops). The GIL is
// released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlfuse/kernels.h"
#if defined(RLFUSE_WITH_CUDA)
#include "rlfuse/cuda_kernels.h"
#endif

namespace py = pybind11;
using namespace rlfuse;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

DType as_dtype(int tag) {
  if (tag < 0 || tag > 2) throw std::invalid_argument("rlfuse._C: unknown dtype tag " + std::to_string(tag));
  return static_cast<DType>(tag);
}

RowLayout as_layout(const py::tuple& t) {
  if (t.size() != 4) throw std::invalid_argument("rlfuse._C: layout must be (rows, inner, stride_outer, stride_inner)");
  RowLayout l{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(), t[3].cast<int64_t>()};
  if (l.rows < 0 || l.inner < 1) throw std::invalid_argument("rlfuse._C: invalid layout");
  return l;
}

TokenLogprobsFwdArgs fwd_args(uintptr_t logits, int dtype, const py::tuple& layout, int64_t vocab,
                              uintptr_t tokens, double inv_temp, uintptr_t logp, uintptr_t entropy,
                              uintptr_t lse) {
  return TokenLogprobsFwdArgs{as_ptr<const void>(logits), as_dtype(dtype), as_layout(layout), vocab,
                              as_ptr<const int64_t>(tokens), static_cast<float>(inv_temp),
                              as_ptr<float>(logp), as_ptr<float>(entropy), as_ptr<float>(lse)};
}

TokenLogprobsBwdArgs bwd_args(uintptr_t logits, int dtype, const py::tuple& layout, int64_t vocab,
                              uintptr_t tokens, double inv_temp, uintptr_t lse, uintptr_t entropy,
                              uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
                              const py::tuple& grad_layout) {
  return TokenLogprobsBwdArgs{as_ptr<const void>(logits), as_dtype(dtype), as_layout(layout), vocab,
                              as_ptr<const int64_t>(tokens), static_cast<float>(inv_temp),
                              as_ptr<const float>(lse), as_ptr<const float>(entropy),
                              as_ptr<const float>(grad_logp), as_ptr<const float>(grad_entropy),
                              as_ptr<void>(grad_logits), as_layout(grad_layout)};
}

#if defined(RLFUSE_WITH_CUDA)
void check_cuda(int error, const char* what) {
  if (error != 0) throw std::runtime_error(std::string("rlfuse: ") + what + " failed: " + cuda_error_string(error));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlfuse compiled kernels (CPU always, CUDA when built with nvcc)";

  m.def("cpu_isa", &cpu_isa);
  m.def(
      "token_logprobs_fwd_cpu",
      [](uintptr_t logits, int dtype, py::tuple layout, int64_t vocab, uintptr_t tokens, double inv_temp,
         uintptr_t logp, uintptr_t entropy, uintptr_t lse, int num_threads) {
        const auto args = fwd_args(logits, dtype, layout, vocab, tokens, inv_temp, logp, entropy, lse);
        py::gil_scoped_release release;
        token_logprobs_fwd_cpu(args, num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("layout"), py::arg("vocab"), py::arg("tokens"),
      py::arg("inv_temp"), py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("num_threads"));

  m.def(
      "token_logprobs_bwd_cpu",
      [](uintptr_t logits, int dtype, py::tuple layout, int64_t vocab, uintptr_t tokens, double inv_temp,
         uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
         py::tuple grad_layout, int num_threads) {
        const auto args = bwd_args(logits, dtype, layout, vocab, tokens, inv_temp, lse, entropy, grad_logp,
                                   grad_entropy, grad_logits, grad_layout);
        py::gil_scoped_release release;
        token_logprobs_bwd_cpu(args, num_threads);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("layout"), py::arg("vocab"), py::arg("tokens"),
      py::arg("inv_temp"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
      py::arg("grad_logits"), py::arg("grad_layout"), py::arg("num_threads"));

#if defined(RLFUSE_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = std::string(RLFUSE_CUDA_ARCHS_STR);
  m.def("cuda_device_count", &cuda_device_count);
  m.def(
      "token_logprobs_fwd_cuda",
      [](uintptr_t logits, int dtype, py::tuple layout, int64_t vocab, uintptr_t tokens, double inv_temp,
         uintptr_t logp, uintptr_t entropy, uintptr_t lse, uintptr_t stream) {
        const auto args = fwd_args(logits, dtype, layout, vocab, tokens, inv_temp, logp, entropy, lse);
        check_cuda(token_logprobs_fwd_cuda(args, as_ptr<void>(stream)), "token_logprobs forward kernel");
      });
  m.def(
      "token_logprobs_bwd_cuda",
      [](uintptr_t logits, int dtype, py::tuple layout, int64_t vocab, uintptr_t tokens, double inv_temp,
         uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
         py::tuple grad_layout, uintptr_t stream) {
        const auto args = bwd_args(logits, dtype, layout, vocab, tokens, inv_temp, lse, entropy, grad_logp,
                                   grad_entropy, grad_logits, grad_layout);
        check_cuda(token_logprobs_bwd_cuda(args, as_ptr<void>(stream)), "token_logprobs backward kernel");
      });
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = std::string();
  m.def("cuda_device_count", [] { return 0; });
#endif
}
