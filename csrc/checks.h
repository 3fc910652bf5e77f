// Error handling shared by every launcher.
//
// * `require(cond, msg)` rejects bad arguments: std::invalid_argument, which pybind11
//   turns into a Python ValueError.
// * `throw_cuda_error(err, what)` turns a cudaError_t into std::runtime_error (Python
//   RuntimeError) naming the call or the kernel. The launchers check cudaGetLastError() right
//   after each launch (after_launch, launch.cuh), so an invalid configuration, a missing kernel
//   image for this GPU or a driver problem is reported against the kernel that caused it.
//   Faults inside a running kernel are asynchronous and surface at the caller's next
//   synchronisation (that is CUDA's model, not ours).
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace hk {

inline std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (error " + std::to_string(static_cast<int>(err)) +
         "): " + cudaGetErrorString(err);
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const std::string& what) {
  throw std::runtime_error("hyperkernels._cuda: CUDA error in " + what + ": " +
                           cuda_error_text(err));
}

// Call at the start of an entry point: an error left pending by earlier, unrelated work (or a
// runtime that cannot initialise) would otherwise be reported against our first kernel.
inline void check_no_pending_error(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("hyperkernels._cuda: CUDA reported an error before ") +
                             op +
                             " launched anything (an error left by earlier work on this thread, "
                             "or a CUDA runtime that cannot start here): " +
                             cuda_error_text(err));
  }
}

inline void require(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("hyperkernels._cuda: " + msg);
}

}  // namespace hk
