// Element access shared by every kernel family: scalar loads that convert to float32, stores
// that round from float32, 16-byte vector access, and the host-side alignment tests that decide
// when a kernel may use it.
//
// Kept apart from the kernels because all of them read memory the same way: inputs go through
// the read-only path (__ldg: no kernel writes a buffer it reads), and the dtype only changes how
// raw bits become a float, which lives here once for float32 / float16 / bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace hk {

template <typename T>
__device__ __forceinline__ float ld(const T* p);

template <>
__device__ __forceinline__ float ld<float>(const float* p) {
  return __ldg(p);
}
template <>
__device__ __forceinline__ float ld<__half>(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
template <>
__device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) {
  // bfloat16 -> float32 is exact: the 16 bits become the high half of the float.
  return __uint_as_float(static_cast<unsigned int>(
                             __ldg(reinterpret_cast<const unsigned short*>(p)))
                         << 16);
}

__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// The two 16-bit values packed in a 32-bit word (element 2j in the low half: little endian).
template <typename T>
__device__ __forceinline__ float lo16(uint32_t w);
template <typename T>
__device__ __forceinline__ float hi16(uint32_t w);
template <>
__device__ __forceinline__ float lo16<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
}
template <>
__device__ __forceinline__ float hi16<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <>
__device__ __forceinline__ float lo16<__nv_bfloat16>(uint32_t w) {
  return __uint_as_float(w << 16);
}
template <>
__device__ __forceinline__ float hi16<__nv_bfloat16>(uint32_t w) {
  return __uint_as_float(w & 0xFFFF0000u);
}

__device__ __forceinline__ float dot_word(float, uint32_t a, uint32_t b, float acc) {
  return fmaf(__uint_as_float(a), __uint_as_float(b), acc);
}
template <typename T>
__device__ __forceinline__ float dot_word(T, uint32_t a, uint32_t b, float acc) {
  acc = fmaf(lo16<T>(a), lo16<T>(b), acc);
  return fmaf(hi16<T>(a), hi16<T>(b), acc);
}

// acc + <a, b> over the 16 bytes of two vectors of T, in element order.
template <typename T>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b, float acc) {
  acc = dot_word(T{}, a.x, b.x, acc);
  acc = dot_word(T{}, a.y, b.y, acc);
  acc = dot_word(T{}, a.z, b.z, acc);
  return dot_word(T{}, a.w, b.w, acc);
}

// Raw bits of element `off` (in elements) from a byte pointer; ELEM = element size in bytes.
template <int ELEM>
__device__ __forceinline__ uint32_t ld_bits(const char* base, int64_t off) {
  if constexpr (ELEM == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(base) + off);
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(base) + off);
  }
}

// Host side: 16-byte vector access is legal for an operand when its pointer and every stride
// of a dim with extent > 1 are 16-byte multiples (a dim of extent 1 is never stepped along).
inline bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }
inline bool stride_ok16(int64_t stride, int64_t extent, int elem) {
  return extent <= 1 || (stride * elem) % 16 == 0;
}

}  // namespace hk
