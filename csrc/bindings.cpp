// The single pybind11 module rlfuse._C. Torch-free: tensors arrive as data pointers (ints),
// sizes and strides, already validated by the Python layer (python/rlfuse/ops). The GIL is
// released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif
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

TokenLossParams as_params(const py::tuple& t) {
  if (t.size() != 14) throw std::invalid_argument("rlfuse._C: TokenLossParams must have 14 fields");
  auto f = [&](size_t i) { return t[i].cast<float>(); };
  return TokenLossParams{t[0].cast<int>(), t[1].cast<int>(), t[2].cast<int>(), f(3), f(4), f(5), f(6),
                         f(7), f(8), f(9), f(10), f(11), f(12), f(13)};
}

// policy_loss_fused(logits, dtype, layout, vocab, tokens, inv_temp, advantages, old_logp, ref_logp,
//                   policy_weight, weight, params, loss, logp, entropy, grad_logits, grad_layout)
PolicyLossFusedArgs fused_args(const py::args& a) {
  if (a.size() != 17) throw std::invalid_argument("rlfuse._C: policy_loss_fused takes 17 arguments + 1");
  auto ptr = [&](size_t i) { return a[i].cast<uintptr_t>(); };
  return PolicyLossFusedArgs{as_ptr<const void>(ptr(0)), as_dtype(a[1].cast<int>()), as_layout(a[2].cast<py::tuple>()),
                             a[3].cast<int64_t>(), as_ptr<const int64_t>(ptr(4)),
                             static_cast<float>(a[5].cast<double>()), as_ptr<const float>(ptr(6)),
                             as_ptr<const float>(ptr(7)), as_ptr<const float>(ptr(8)), as_ptr<const float>(ptr(9)),
                             as_ptr<const float>(ptr(10)), as_params(a[11].cast<py::tuple>()), as_ptr<float>(ptr(12)),
                             as_ptr<float>(ptr(13)), as_ptr<float>(ptr(14)), as_ptr<void>(ptr(15)),
                             as_layout(a[16].cast<py::tuple>())};
}

// kl_div_fwd(logits, other, dtype, layout, other_layout, vocab, inv_temp, direction, kl, lse, other_lse)
KlDivFwdArgs kl_fwd_args(const py::args& a) {
  if (a.size() != 11) throw std::invalid_argument("rlfuse._C: kl_div_fwd takes 11 arguments + 1");
  auto ptr = [&](size_t i) { return a[i].cast<uintptr_t>(); };
  return KlDivFwdArgs{as_ptr<const void>(ptr(0)), as_ptr<const void>(ptr(1)), as_dtype(a[2].cast<int>()),
                      as_layout(a[3].cast<py::tuple>()), as_layout(a[4].cast<py::tuple>()), a[5].cast<int64_t>(),
                      static_cast<float>(a[6].cast<double>()), a[7].cast<int>(), as_ptr<float>(ptr(8)),
                      as_ptr<float>(ptr(9)), as_ptr<float>(ptr(10))};
}

// kl_div_bwd(logits, other, dtype, layout, other_layout, vocab, inv_temp, direction, kl, lse, other_lse,
//            grad_kl, grad_logits (0 = none), grad_layout, grad_other (0 = none), grad_other_layout)
KlDivBwdArgs kl_bwd_args(const py::args& a) {
  if (a.size() != 16) throw std::invalid_argument("rlfuse._C: kl_div_bwd takes 16 arguments + 1");
  auto ptr = [&](size_t i) { return a[i].cast<uintptr_t>(); };
  return KlDivBwdArgs{as_ptr<const void>(ptr(0)), as_ptr<const void>(ptr(1)), as_dtype(a[2].cast<int>()),
                      as_layout(a[3].cast<py::tuple>()), as_layout(a[4].cast<py::tuple>()), a[5].cast<int64_t>(),
                      static_cast<float>(a[6].cast<double>()), a[7].cast<int>(), as_ptr<const float>(ptr(8)),
                      as_ptr<const float>(ptr(9)), as_ptr<const float>(ptr(10)), as_ptr<const float>(ptr(11)),
                      as_ptr<void>(ptr(12)), as_layout(a[13].cast<py::tuple>()), as_ptr<void>(ptr(14)),
                      as_layout(a[15].cast<py::tuple>())};
}

// row_topk(logits, dtype, layout, vocab, tokens, inv_temp, k, topk_ids, topk_values, logp, entropy, lse)
RowTopkArgs topk_args(const py::args& a) {
  if (a.size() != 12) throw std::invalid_argument("rlfuse._C: row_topk takes 12 arguments + 1");
  auto ptr = [&](size_t i) { return a[i].cast<uintptr_t>(); };
  const int64_t k = a[6].cast<int64_t>();
  if (k < 1) throw std::invalid_argument("rlfuse._C: row_topk needs k >= 1");
  return RowTopkArgs{as_ptr<const void>(ptr(0)), as_dtype(a[1].cast<int>()), as_layout(a[2].cast<py::tuple>()),
                     a[3].cast<int64_t>(), as_ptr<const int64_t>(ptr(4)), static_cast<float>(a[5].cast<double>()),
                     k, as_ptr<int32_t>(ptr(7)), as_ptr<float>(ptr(8)), as_ptr<float>(ptr(9)), as_ptr<float>(ptr(10)),
                     as_ptr<float>(ptr(11))};
}

// sample(logits, dtype, layout, vocab, temperature, top_k, top_p, min_p, seed, num_samples, adaptive,
//        (t_min, t_max, h_low, h_high), tokens, logprobs, raw_logprobs, entropy)
SampleArgs sample_args(const py::args& a) {
  if (a.size() != 16) throw std::invalid_argument("rlfuse._C: sample takes 16 arguments + 1");
  auto ptr = [&](size_t i) { return a[i].cast<uintptr_t>(); };
  const auto adaptive = a[11].cast<py::tuple>();
  if (adaptive.size() != 4) throw std::invalid_argument("rlfuse._C: adaptive temperature needs 4 values");
  return SampleArgs{as_ptr<const void>(ptr(0)), as_dtype(a[1].cast<int>()), as_layout(a[2].cast<py::tuple>()),
                    a[3].cast<int64_t>(), as_ptr<const float>(ptr(4)), as_ptr<const int32_t>(ptr(5)),
                    as_ptr<const float>(ptr(6)), as_ptr<const float>(ptr(7)), as_ptr<const uint64_t>(ptr(8)),
                    a[9].cast<int64_t>(), a[10].cast<int>(), adaptive[0].cast<float>(), adaptive[1].cast<float>(),
                    adaptive[2].cast<float>(), adaptive[3].cast<float>(), as_ptr<int64_t>(ptr(12)),
                    as_ptr<float>(ptr(13)), as_ptr<float>(ptr(14)), as_ptr<float>(ptr(15))};
}

// Splits py::args into the kernel arguments and the trailing launch argument (threads or stream).
std::pair<py::args, py::handle> split_last(const py::args& a) {
  return {py::args(a[py::slice(0, a.size() - 1, 1)]), a[a.size() - 1]};
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
  // Advises the 2 MiB-aligned interior of [address, address + nbytes) to be backed by transparent
  // huge pages before it is first written (Linux; THP in "madvise" or "always" mode). Returns
  // whether the advice was taken. Only a hint: the memory stays ordinary memory either way.
  m.def("advise_huge_pages", [](uintptr_t address, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
    const uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (address + nbytes) & ~(kHugePage - 1);
    if (end > begin) return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#endif
    (void)address;
    (void)nbytes;
    return false;
  });
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

  // <op>_cpu(<kernel arguments>, num_threads), GIL released while the kernel runs.
  m.def("policy_loss_fused_cpu", [](py::args a) {
    auto [kernel_args, threads] = split_last(a);
    const auto args = fused_args(kernel_args);
    const int num_threads = threads.cast<int>();  // while holding the GIL
    py::gil_scoped_release release;
    policy_loss_fused_cpu(args, num_threads);
  });
  m.def("kl_div_fwd_cpu", [](py::args a) {
    auto [kernel_args, threads] = split_last(a);
    const auto args = kl_fwd_args(kernel_args);
    const int num_threads = threads.cast<int>();  // while holding the GIL
    py::gil_scoped_release release;
    kl_div_fwd_cpu(args, num_threads);
  });
  m.def("row_topk_cpu", [](py::args a) {
    auto [kernel_args, threads] = split_last(a);
    const auto args = topk_args(kernel_args);
    const int num_threads = threads.cast<int>();
    py::gil_scoped_release release;
    row_topk_cpu(args, num_threads);
  });
  m.def("sample_cpu", [](py::args a) {
    auto [kernel_args, threads] = split_last(a);
    const auto args = sample_args(kernel_args);
    const int num_threads = threads.cast<int>();
    py::gil_scoped_release release;
    sample_cpu(args, num_threads);
  });
  m.def("kl_div_bwd_cpu", [](py::args a) {
    auto [kernel_args, threads] = split_last(a);
    const auto args = kl_bwd_args(kernel_args);
    const int num_threads = threads.cast<int>();  // while holding the GIL
    py::gil_scoped_release release;
    kl_div_bwd_cpu(args, num_threads);
  });

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
  // <op>_cuda(<kernel arguments>, stream): asynchronous on the stream.
  m.def("policy_loss_fused_cuda", [](py::args a) {
    auto [kernel_args, stream] = split_last(a);
    check_cuda(policy_loss_fused_cuda(fused_args(kernel_args), as_ptr<void>(stream.cast<uintptr_t>())),
               "policy_loss fused kernel");
  });
  m.def("kl_div_fwd_cuda", [](py::args a) {
    auto [kernel_args, stream] = split_last(a);
    check_cuda(kl_div_fwd_cuda(kl_fwd_args(kernel_args), as_ptr<void>(stream.cast<uintptr_t>())), "kl_div forward");
  });
  m.def("row_topk_cuda", [](py::args a) {
    auto [kernel_args, stream] = split_last(a);
    check_cuda(row_topk_cuda(topk_args(kernel_args), as_ptr<void>(stream.cast<uintptr_t>())), "row_topk");
  });
  m.def("sample_cuda", [](py::args a) {
    auto [kernel_args, stream] = split_last(a);
    check_cuda(sample_cuda(sample_args(kernel_args), as_ptr<void>(stream.cast<uintptr_t>())), "sample");
  });
  m.def("kl_div_bwd_cuda", [](py::args a) {
    auto [kernel_args, stream] = split_last(a);
    check_cuda(kl_div_bwd_cuda(kl_bwd_args(kernel_args), as_ptr<void>(stream.cast<uintptr_t>())), "kl_div backward");
  });
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = std::string();
  m.def("cuda_device_count", [] { return 0; });
#endif
}
