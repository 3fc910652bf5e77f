// What every launcher of a kernel family does around a <<<...>>> launch: size a 1-D grid, and
// turn a failed launch into an exception that names the op, the kernel and the dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "kernels.h"

namespace hk {

constexpr i64 kMaxGridX = 2147483647;  // gridDim.x limit (blockIdx.y / z are never used)

// Blocks beyond the limit are not needed: every kernel walks its work with a block-stride loop.
inline unsigned grid_size(i64 blocks) {
  return static_cast<unsigned>(std::max<i64>(1, std::min(blocks, kMaxGridX)));
}

inline const char* type_name(float) { return "float32"; }
inline const char* type_name(__half) { return "float16"; }
inline const char* type_name(__nv_bfloat16) { return "bfloat16"; }

// After every launch: cudaGetLastError, and on failure an exception naming op, kernel and dtype
// (the message is only built on failure).
template <typename T>
void after_launch(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw_cuda_error(err, std::string(op) + ", launch of " + kernel + "<" + type_name(T{}) + ">");
  }
}

}  // namespace hk
