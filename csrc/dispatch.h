// Compile-time switches: the dtype switch (the one place that maps the integer dtype code
// Python passes to a C++ type) and small integer / bool switches used by the launchers.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "checks.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace hk {

// Dtype codes: the Python side passes one of these ints (exported as DTYPE_* in the module).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};
constexpr int kNumDTypes = 3;

inline void check_dtype(int code) {
  require(code >= 0 && code < kNumDTypes,
          "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
              std::to_string(code));
}

template <typename T>
struct TypeTag {
  using type = T;
};

#ifdef __CUDACC__
// Calls f(TypeTag<T>{}) with T = float / __half / __nv_bfloat16.
template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: check_dtype(code);
  }
}
#endif

// Calls f(std::integral_constant<int, G>{}) for G in {4, 8, 16, 32} (threads per output row of
// the GEMV kernel).
template <typename F>
void dispatch_group_size(int g, F&& f) {
  switch (g) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: require(false, "internal error: unsupported GEMV group size " + std::to_string(g));
  }
}

// Calls f(std::bool_constant<b>{}).
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace hk
