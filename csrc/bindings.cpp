// The only PYBIND11_MODULE of the project: hyperkernels._cuda.
//
// It does not link libtorch: Python passes tensor.data_ptr() values (0 for an absent tensor),
// sizes, strides in elements, dtype / activation codes and
// torch.cuda.current_stream().cuda_stream, as the fields of one argument struct per entry point
// (LinearForwardArgs, LinearBackwardArgs). Launches are asynchronous on that stream; nothing
// allocates, synchronises or changes the current device.
// Errors: bad arguments raise ValueError, CUDA errors RuntimeError (naming the kernel).
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "activations.cuh"
#include "batched_linear.h"
#include "checks.h"
#include "dispatch.h"

#ifndef HK_CUDA_ARCHS
#define HK_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

// cudaGetDeviceCount without raising: (count, error). On a machine without a driver this is
// (0, cudaErrorInsufficientDriver), with no device (0, cudaErrorNoDevice).
std::pair<int, cudaError_t> query_device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // do not leave the error pending for the next call
    return {0, err};
  }
  return {n, cudaSuccess};
}

// The argument structs' fields, visited in declaration order as (name, member pointer): the one
// place the bindings learn the field lists of batched_linear.h.
#define HK_VISIT_FIELD(type, name, init) f(#name, &Args::name);

template <typename F>
void for_each_field(hk::LinearForwardArgs*, F&& f) {
  using Args = hk::LinearForwardArgs;
  HK_LINEAR_FORWARD_FIELDS(HK_VISIT_FIELD)
}

template <typename F>
void for_each_field(hk::LinearBackwardArgs*, F&& f) {
  using Args = hk::LinearBackwardArgs;
  HK_LINEAR_BACKWARD_FIELDS(HK_VISIT_FIELD)
}

#undef HK_VISIT_FIELD

template <typename Args>
std::vector<std::string> field_names() {
  std::vector<std::string> names;
  for_each_field(static_cast<Args*>(nullptr),
                 [&](const char* name, auto) { names.emplace_back(name); });
  return names;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Every field from a keyword of the same name: a missing, unknown or ill-typed keyword is a
// TypeError naming it, so no field is ever left at its default by mistake (a forgotten stride
// would silently read the wrong memory).
template <typename Args>
Args args_from_kwargs(const char* cls, const py::kwargs& kw) {
  Args a;
  std::vector<std::string> missing;
  size_t used = 0;
  for_each_field(&a, [&](const char* name, auto member) {
    if (!kw.contains(name)) {
      missing.emplace_back(name);
      return;
    }
    using Field = std::remove_reference_t<decltype(a.*member)>;
    const py::handle value = kw[name];
    try {
      a.*member = value.cast<Field>();
    } catch (const py::cast_error&) {
      const std::string bits = std::to_string(8 * sizeof(Field));
      const std::string want = std::is_same<Field, bool>::value         ? "a bool"
                               : std::is_floating_point<Field>::value   ? "a float"
                               : std::is_unsigned<Field>::value         ? "an address (an int >= 0)"
                                                                        : "a " + bits + "-bit int";
      throw py::type_error(std::string(cls) + ": " + name + " must be " + want + ", got " +
                           py::repr(value).cast<std::string>());
    }
    ++used;
  });
  if (!missing.empty()) {
    throw py::type_error(std::string(cls) + "() missing keyword(s): " + joined(missing) +
                         " (every field is required)");
  }
  if (used != kw.size()) {
    const std::vector<std::string> known = field_names<Args>();
    std::vector<std::string> unknown;
    for (const auto& item : kw) {
      const std::string key = py::str(item.first);
      if (std::find(known.begin(), known.end(), key) == known.end()) unknown.push_back(key);
    }
    throw py::type_error(std::string(cls) + "() got unexpected keyword(s): " + joined(unknown));
  }
  return a;
}

// A Python class for an argument struct: a read-write attribute per field, a constructor taking
// every field as a keyword, FIELDS (the names in declaration order) and a repr listing them.
template <typename Args>
void bind_args(py::module_& m, const char* cls, const char* doc) {
  py::class_<Args> c(m, cls, doc);
  for_each_field(static_cast<Args*>(nullptr),
                 [&](const char* name, auto member) { c.def_readwrite(name, member); });
  c.def(py::init([cls](const py::kwargs& kw) { return args_from_kwargs<Args>(cls, kw); }));
  const std::vector<std::string> names = field_names<Args>();
  py::tuple fields(names.size());
  for (size_t i = 0; i < names.size(); ++i) fields[i] = py::str(names[i]);
  c.attr("FIELDS") = fields;
  c.def("__repr__", [cls, names](const py::object& self) {
    std::string out = std::string(cls) + "(";
    for (size_t i = 0; i < names.size(); ++i) {
      const py::object value = self.attr(names[i].c_str());
      out += (i ? ", " : "") + names[i] + "=" + py::repr(value).cast<std::string>();
    }
    return out + ")";
  });
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "hyperkernels CUDA kernels (raw pointers, strides in elements, no libtorch).\n"
      "Use it through hyperkernels' Python API; the functions here do no tensor checks\n"
      "beyond sizes, codes and null pointers.";

  // ---- availability ----
  m.def(
      "device_count", [] { return query_device_count().first; },
      "Number of CUDA devices the runtime sees; 0 when there is no usable driver or device "
      "(see driver_error()). Never raises.");
  m.def(
      "driver_error",
      []() -> std::string {
        const auto r = query_device_count();
        if (r.second != cudaSuccess) return hk::cuda_error_text(r.second);
        if (r.first == 0) return "no CUDA device found";
        return "";
      },
      "Why the CUDA backend cannot run here ('' when device_count() > 0), e.g. "
      "'cudaErrorInsufficientDriver (error 35): CUDA driver version is insufficient for CUDA "
      "runtime version' on a machine without an NVIDIA driver.");
  m.def(
      "driver_version",
      [] {
        int v = 0;
        if (cudaDriverGetVersion(&v) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return v;
      },
      "CUDA driver API version (e.g. 13000), 0 when no driver is installed.");
  m.attr("CUDART_VERSION") = CUDART_VERSION;  // the runtime this module was built against
  m.attr("CUDA_ARCHS") = HK_CUDA_ARCHS;       // CMAKE_CUDA_ARCHITECTURES of the build

  // ---- codes ----
  m.attr("DTYPE_FLOAT32") = static_cast<int>(hk::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(hk::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(hk::kBFloat16);
  py::tuple acts(hk::kNumActs);
  for (int i = 0; i < hk::kNumActs; ++i) acts[i] = py::str(hk::act_name(i));
  m.attr("ACTIVATIONS") = acts;  // ACTIVATIONS[code] == name

  // ---- batched linear ----
  bind_args<hk::LinearForwardArgs>(
      m, "LinearForwardArgs",
      "Arguments of linear_forward (csrc/batched_linear.h states their contract): pointers are "
      "data_ptr() ints (0: absent), strides in elements, stream a cudaStream_t int. Every field "
      "is a required keyword of the constructor.");
  bind_args<hk::LinearBackwardArgs>(
      m, "LinearBackwardArgs",
      "Arguments of linear_backward (csrc/batched_linear.h states their contract); every field "
      "is a required keyword of the constructor.");

  m.def("linear_forward", &hk::linear_forward,
        "y[b,n,m] = act(sum_k x[b,n,k] w[b,m,k] + bias[b,m]); optionally preact = z.\n"
        "bias / preact may be 0; preact uses y's strides. Asynchronous on `stream`.",
        py::arg("args"), py::call_guard<py::gil_scoped_release>());

  m.def("linear_backward", &hk::linear_backward,
        "dz = dy * act'(saved); dx = dz @ w; dw[b] = dz[b]^T x[b]; db[b] = sum_n dz[b].\n"
        "dx / dw / db may be 0 (not wanted). `saved` is the preact z (saved_is_preact=True) or "
        "the output y. dz is a (B,N,M) scratch the kernels write when act != none and dx or dw "
        "is wanted (else may be 0). workspace: linear_backward_workspace_size() bytes.",
        py::arg("args"), py::call_guard<py::gil_scoped_release>());

  m.def("linear_backward_workspace_size", &hk::linear_backward_workspace_size,
        "Bytes of float32 workspace linear_backward needs (0: none, pass workspace=0). A pure "
        "function of its arguments.",
        py::arg("B"), py::arg("N"), py::arg("M"), py::arg("K"), py::arg("need_dw"),
        py::arg("need_db"));
}
