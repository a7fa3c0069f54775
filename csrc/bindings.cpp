// The single pybind11 module rlfuse._C. Torch-free: tensors arrive as data pointers (ints),
// sizes and strides, already validated by the Python layer (python/rlfuse/ops). Every kernel entry
// takes its argument struct's fields by name (schema.h, generated from python/rlfuse/_schema.py):
// no positions, no field counts. The GIL is released while CPU kernels run.
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

// ---- One Python value -> one struct field, by the field's C++ type (schema.h) -------------------
// Pointers arrive as int addresses (0 = null), DType as its tag, RowLayout as the tuple
// (rows, inner, stride_outer, stride_inner), a nested struct (TokenLossParams) as a dict of its
// fields; `Tag` is the enum an int field holds (void: any int). `path` names the field in errors.

template <typename T>
T cast_field(py::handle value, const std::string& path, const char* expected) {
  try {
    return value.cast<T>();
  } catch (const py::cast_error&) {
    throw py::type_error(path + " must be " + expected + ", got " + std::string(py::str(py::type::of(value).attr("__name__"))));
  }
}

template <typename E>
int checked_enum(py::handle value, const std::string& path) {
  const int v = cast_field<int>(value, path, "an int");
  if (v < 0 || v >= EnumInfo<E>::kCount) {
    throw std::invalid_argument(path + ": " + std::to_string(v) + " is not a " + EnumInfo<E>::kName + " (0 .. " +
                                std::to_string(EnumInfo<E>::kCount - 1) + ")");
  }
  return v;
}

template <typename T>
void assign(py::handle value, T*& field, void*, const std::string& path) {
  field = reinterpret_cast<T*>(cast_field<uintptr_t>(value, path, "an int address"));
}
void assign(py::handle value, int64_t& field, void*, const std::string& path) {
  field = cast_field<int64_t>(value, path, "an int");
}
void assign(py::handle value, float& field, void*, const std::string& path) {
  field = static_cast<float>(cast_field<double>(value, path, "a float"));
}
void assign(py::handle value, double& field, void*, const std::string& path) {
  field = cast_field<double>(value, path, "a float");
}
void assign(py::handle value, int& field, void*, const std::string& path) {
  field = cast_field<int>(value, path, "an int");
}
template <typename E>
void assign(py::handle value, int& field, E*, const std::string& path) {
  field = checked_enum<E>(value, path);
}
void assign(py::handle value, DType& field, void*, const std::string& path) {
  field = static_cast<DType>(checked_enum<DType>(value, path));
}

// Nested structs (TokenLossParams) come as dicts, RowLayout as its tuple (defined below).
template <typename S, typename = decltype(struct_name(static_cast<const S*>(nullptr)))>
void assign(py::handle value, S& field, void*, const std::string& path);
void assign(py::handle value, RowLayout& field, void*, const std::string& path);

// The field names of S, in order (for error messages).
template <typename S>
std::string field_names() {
  std::string names;
  visit_fields(S{}, [&](const char* name, const auto&, auto*) { names += (names.empty() ? "" : ", ") + std::string(name); });
  return names;
}

// A struct from a dict holding exactly its fields, by name.
template <typename S>
S from_dict(py::handle value, const std::string& path) {
  if (!py::isinstance<py::dict>(value)) {
    throw py::type_error(path + " must be a dict of the fields of " + struct_name(static_cast<S*>(nullptr)));
  }
  const auto values = py::reinterpret_borrow<py::dict>(value);
  S s{};
  // Unknown names first: a misspelt field is reported as itself, not as the field it misses.
  for (const auto& item : values) {
    const std::string key = py::str(item.first);
    bool known = false;
    visit_fields(s, [&](const char* name, const auto&, auto*) { known = known || key == name; });
    if (!known) {
      throw std::invalid_argument(path + ": unknown argument '" + key + "' (fields of " +
                                  struct_name(static_cast<S*>(nullptr)) + ": " + field_names<S>() + ")");
    }
  }
  visit_fields(s, [&](const char* name, auto& field, auto* tag) {
    if (!values.contains(name)) {
      throw std::invalid_argument(path + ": missing argument '" + name + "' (fields of " +
                                  struct_name(static_cast<S*>(nullptr)) + ": " + field_names<S>() + ")");
    }
    assign(values[name], field, tag, path + "." + name);
  });
  return s;
}

template <typename S, typename>
void assign(py::handle value, S& field, void*, const std::string& path) {
  field = from_dict<S>(value, path);
}
void assign(py::handle value, RowLayout& field, void*, const std::string& path) {
  if (!py::isinstance<py::tuple>(value) && !py::isinstance<py::list>(value)) {
    throw py::type_error(path + " must be the tuple (" + field_names<RowLayout>() + ")");
  }
  const auto items = py::reinterpret_borrow<py::sequence>(value);
  size_t i = 0, count = 0;
  visit_fields(field, [&](const char*, const auto&, auto*) { ++count; });
  if (items.size() != count) throw std::invalid_argument(path + " must be the tuple (" + field_names<RowLayout>() + ")");
  visit_fields(field, [&](const char* name, int64_t& v, void*) { v = cast_field<int64_t>(items[i++], path + "." + name, "an int"); });
  if (field.rows < 0 || field.inner < 1) throw std::invalid_argument(path + ": invalid layout (rows < 0 or inner < 1)");
}

// Checks a kernel needs beyond its field types.
template <typename Args>
void validate(const Args&, const std::string&) {}
void validate(const RowTopkArgs& a, const std::string& entry) {
  if (a.k < 1) throw std::invalid_argument(entry + " needs k >= 1");
}
void validate(const TrollArgs& a, const std::string& entry) {
  if (a.k < 1) throw std::invalid_argument(entry + " needs k >= 1");
  if (a.old_k < 0) throw std::invalid_argument(entry + " needs old_k >= 0");
}

// <entry>(**fields, <launch>=...): keyword arguments only, exactly the fields of Args plus the
// launch argument (num_threads or stream). Returns the struct and the launch argument.
template <typename Args>
std::pair<Args, py::object> parse(const std::string& entry, const py::args& args, const py::kwargs& kwargs,
                                  const char* launch) {
  const char* name = struct_name(static_cast<Args*>(nullptr));
  if (args.size() != 0) {
    throw std::invalid_argument(entry + " takes keyword arguments only: the fields of " + name + " (" +
                                field_names<Args>() + ") and " + launch);
  }
  auto fields = py::reinterpret_steal<py::dict>(PyDict_Copy(kwargs.ptr()));
  if (!fields.contains(launch)) throw std::invalid_argument(entry + ": missing argument '" + launch + "'");
  py::object launch_value = fields[launch];
  PyDict_DelItemString(fields.ptr(), launch);
  Args a = from_dict<Args>(fields, entry);
  validate(a, entry);
  return {a, launch_value};
}

template <typename Args>
std::string entry_doc(const char* launch) {
  return std::string("Keyword arguments: the fields of ") + struct_name(static_cast<Args*>(nullptr)) + " (" +
         field_names<Args>() + ") and " + launch + " (csrc/include/rlfuse/schema.h).";
}

// <kernel>_cpu(**fields, num_threads): GIL released while the kernel runs.
template <typename Args>
void def_cpu(py::module_& m, const char* name, void (*kernel)(const Args&, int)) {
  m.def(
      name,
      [name, kernel](const py::args& a, const py::kwargs& kw) {
        auto [args, threads] = parse<Args>(std::string("rlfuse._C.") + name, a, kw, "num_threads");
        const int num_threads = py::cast<int>(threads);  // while holding the GIL
        py::gil_scoped_release release;
        kernel(args, num_threads);
      },
      entry_doc<Args>("num_threads").c_str());
}

#if defined(RLFUSE_WITH_CUDA)
void check_cuda(int error, const std::string& what) {
  if (error != 0) throw std::runtime_error("rlfuse: " + what + " failed: " + cuda_error_string(error));
}

// <kernel>_cuda(**fields, stream): asynchronous on the stream (an int cudaStream_t).
template <typename Args>
void def_cuda(py::module_& m, const char* name, int (*kernel)(const Args&, void*)) {
  m.def(
      name,
      [name, kernel](const py::args& a, const py::kwargs& kw) {
        const std::string entry = std::string("rlfuse._C.") + name;
        auto [args, stream] = parse<Args>(entry, a, kw, "stream");
        check_cuda(kernel(args, reinterpret_cast<void*>(py::cast<uintptr_t>(stream))), entry);
      },
      entry_doc<Args>("stream").c_str());
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
  // Every kernel of schema.h's RLFUSE_KERNELS, by name: <kernel>_cpu(**fields, num_threads).
#define RLFUSE_BIND_CPU(kernel, Args) def_cpu<Args>(m, #kernel "_cpu", &kernel##_cpu);
  RLFUSE_KERNELS(RLFUSE_BIND_CPU)
#undef RLFUSE_BIND_CPU

#if defined(RLFUSE_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = std::string(RLFUSE_CUDA_ARCHS_STR);
  m.def("cuda_device_count", &cuda_device_count);
  // <kernel>_cuda(**fields, stream) for every kernel of RLFUSE_KERNELS.
#define RLFUSE_BIND_CUDA(kernel, Args) def_cuda<Args>(m, #kernel "_cuda", &kernel##_cuda);
  RLFUSE_KERNELS(RLFUSE_BIND_CUDA)
#undef RLFUSE_BIND_CUDA
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = std::string();
  m.def("cuda_device_count", [] { return 0; });
#endif
}
