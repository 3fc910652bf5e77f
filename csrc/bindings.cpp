// The only PYBIND11_MODULE of the project: hyperkernels._cuda.
//
// It does not link libtorch: Python passes tensor.data_ptr() values (0 for an absent tensor),
// sizes, strides in elements, dtype / activation codes and
// torch.cuda.current_stream().cuda_stream. Launches are asynchronous on that stream; nothing
// allocates, synchronises or changes the current device.
// Errors: bad arguments raise ValueError, CUDA errors RuntimeError (naming the kernel).
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "activations.cuh"
#include "batched_linear.h"
#include "checks.h"
#include "dispatch.h"

#ifndef HK_CUDA_ARCHS
#define HK_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using std::int64_t;
using std::uintptr_t;

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

void linear_forward_py(int dtype, int act, float w0, bool allow_tf32, int64_t B, int64_t N,
                       int64_t M, int64_t K, uintptr_t x, int64_t sxb, int64_t sxn, int64_t sxk,
                       uintptr_t w, int64_t swb, int64_t swm, int64_t swk, uintptr_t bias,
                       int64_t sbb, int64_t sbm, uintptr_t y, int64_t syb, int64_t syn,
                       int64_t sym, uintptr_t preact, uintptr_t stream) {
  hk::LinearForwardArgs a;
  a.dtype = dtype, a.act = act, a.w0 = w0, a.allow_tf32 = allow_tf32;
  a.B = B, a.N = N, a.M = M, a.K = K;
  a.x = x, a.sxb = sxb, a.sxn = sxn, a.sxk = sxk;
  a.w = w, a.swb = swb, a.swm = swm, a.swk = swk;
  a.bias = bias, a.sbb = sbb, a.sbm = sbm;
  a.y = y, a.syb = syb, a.syn = syn, a.sym = sym;
  a.preact = preact;
  a.stream = stream;
  hk::linear_forward(a);
}

void linear_backward_py(int dtype, int act, float w0, bool allow_tf32, int64_t B, int64_t N,
                        int64_t M, int64_t K, uintptr_t x, int64_t sxb, int64_t sxn, int64_t sxk,
                        uintptr_t w, int64_t swb, int64_t swm, int64_t swk, uintptr_t dy,
                        int64_t sdyb, int64_t sdyn, int64_t sdym, uintptr_t saved, int64_t ssb,
                        int64_t ssn, int64_t ssm, bool saved_is_preact, uintptr_t dz,
                        int64_t sdzb, int64_t sdzn, int64_t sdzm, uintptr_t dx, int64_t sdxb,
                        int64_t sdxn, int64_t sdxk, uintptr_t dw, int64_t sdwb, int64_t sdwm,
                        int64_t sdwk, uintptr_t db, int64_t sdbb, int64_t sdbm,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  hk::LinearBackwardArgs a;
  a.dtype = dtype, a.act = act, a.w0 = w0, a.allow_tf32 = allow_tf32;
  a.B = B, a.N = N, a.M = M, a.K = K;
  a.x = x, a.sxb = sxb, a.sxn = sxn, a.sxk = sxk;
  a.w = w, a.swb = swb, a.swm = swm, a.swk = swk;
  a.dy = dy, a.sdyb = sdyb, a.sdyn = sdyn, a.sdym = sdym;
  a.saved = saved, a.ssb = ssb, a.ssn = ssn, a.ssm = ssm, a.saved_is_preact = saved_is_preact;
  a.dz = dz, a.sdzb = sdzb, a.sdzn = sdzn, a.sdzm = sdzm;
  a.dx = dx, a.sdxb = sdxb, a.sdxn = sdxn, a.sdxk = sdxk;
  a.dw = dw, a.sdwb = sdwb, a.sdwm = sdwm, a.sdwk = sdwk;
  a.db = db, a.sdbb = sdbb, a.sdbm = sdbm;
  a.workspace = workspace, a.workspace_bytes = workspace_bytes;
  a.stream = stream;
  hk::linear_backward(a);
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
  m.attr("ACT_NONE") = static_cast<int>(hk::kActNone);
  m.attr("ACT_RELU") = static_cast<int>(hk::kActRelu);
  m.attr("ACT_GELU") = static_cast<int>(hk::kActGelu);
  m.attr("ACT_SILU") = static_cast<int>(hk::kActSilu);
  m.attr("ACT_TANH") = static_cast<int>(hk::kActTanh);
  m.attr("ACT_SIGMOID") = static_cast<int>(hk::kActSigmoid);
  m.attr("ACT_SINE") = static_cast<int>(hk::kActSine);

  // ---- batched linear ----
  m.def("linear_forward", &linear_forward_py,
        "y[b,n,m] = act(sum_k x[b,n,k] w[b,m,k] + bias[b,m]); optionally preact = z.\n"
        "Pointers are data_ptr() ints (bias / preact may be 0), strides in elements; preact "
        "uses y's strides. Asynchronous on `stream`.",
        py::arg("dtype"), py::arg("act"), py::arg("w0"), py::arg("allow_tf32"), py::arg("B"),
        py::arg("N"), py::arg("M"), py::arg("K"), py::arg("x"), py::arg("sxb"), py::arg("sxn"),
        py::arg("sxk"), py::arg("w"), py::arg("swb"), py::arg("swm"), py::arg("swk"),
        py::arg("bias"), py::arg("sbb"), py::arg("sbm"), py::arg("y"), py::arg("syb"),
        py::arg("syn"), py::arg("sym"), py::arg("preact"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("linear_backward", &linear_backward_py,
        "dz = dy * act'(saved); dx = dz @ w; dw[b] = dz[b]^T x[b]; db[b] = sum_n dz[b].\n"
        "dx / dw / db may be 0 (not wanted). `saved` is the preact z (saved_is_preact=True) or "
        "the output y. dz is a (B,N,M) scratch the kernels write when act != none and dx or dw "
        "is wanted (else may be 0). workspace: linear_backward_workspace_size() bytes.",
        py::arg("dtype"), py::arg("act"), py::arg("w0"), py::arg("allow_tf32"), py::arg("B"),
        py::arg("N"), py::arg("M"), py::arg("K"), py::arg("x"), py::arg("sxb"), py::arg("sxn"),
        py::arg("sxk"), py::arg("w"), py::arg("swb"), py::arg("swm"), py::arg("swk"),
        py::arg("dy"), py::arg("sdyb"), py::arg("sdyn"), py::arg("sdym"), py::arg("saved"),
        py::arg("ssb"), py::arg("ssn"), py::arg("ssm"), py::arg("saved_is_preact"),
        py::arg("dz"), py::arg("sdzb"), py::arg("sdzn"), py::arg("sdzm"), py::arg("dx"),
        py::arg("sdxb"), py::arg("sdxn"), py::arg("sdxk"), py::arg("dw"), py::arg("sdwb"),
        py::arg("sdwm"), py::arg("sdwk"), py::arg("db"), py::arg("sdbb"), py::arg("sdbm"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("linear_backward_workspace_size", &hk::linear_backward_workspace_size,
        "Bytes of float32 workspace linear_backward needs (0: none, pass workspace=0). A pure "
        "function of its arguments.",
        py::arg("B"), py::arg("N"), py::arg("M"), py::arg("K"), py::arg("need_dw"),
        py::arg("need_db"));
}
