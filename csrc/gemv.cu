// GEMV kernels: the one-token (N == 1) forward and dx, out[b, c] = act(sum_d x[b, d] w[b, c, d]
// + bias[b, c]).
//
// Memory-bound: the floor is reading every weight once, so the two variants differ only in how
// lanes walk the weight. gemv_rows_kernel puts G lanes on one output row (G in 4..32, several
// rows per warp for small widths), with 16-byte vector loads when the reduction dim is
// contiguous and aligned and a warp-shuffle sum. gemv_cols_kernel serves the case where instead
// the output dim is contiguous (dx = dz @ w with a row-major w): lanes run along outputs
// (coalesced) and 8 warps split the reduction.
#include <cuda_runtime.h>

#include <type_traits>

#include "activations.cuh"
#include "dispatch.h"
#include "kernels.h"
#include "launch.cuh"
#include "memory.cuh"

namespace hk {
namespace {

constexpr int kGemvThreads = 256;

template <typename T>
__device__ __forceinline__ void gemv_store(const GemvParams& p, i64 b, i64 c, float z) {
  if (p.bias != nullptr) z += ld(static_cast<const T*>(p.bias) + b * p.sbb + c * p.sbc);
  const i64 off = b * p.sob + c * p.soc;
  if (p.pre != nullptr) st(static_cast<T*>(p.pre) + off, z);
  st(static_cast<T*>(p.out) + off, act_forward(p.act, z, p.w0));
}

// G consecutive lanes compute one output row (b, c); a warp handles 32 / G rows, so small
// widths still keep every lane busy and a warp's loads cover consecutive rows. VEC: 16-byte
// loads of w and x along d (host checked: swd == sxd == 1, pointers and the b / c strides
// 16-byte aligned); the D % (16 / sizeof(T)) tail is read with scalar loads.
// (min 4 blocks per SM: without it ptxas 13 picks 40 registers for sm_90 and spills 4 bytes;
// with it, about 60 registers, no spill, still 32 resident warps per SM for latency hiding.)
template <typename T, int G, bool VEC>
__global__ void __launch_bounds__(kGemvThreads, 4) gemv_rows_kernel(const GemvParams p) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "G must be a power of two <= 32");
  constexpr int kRowsPerWarp = 32 / G;
  constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));
  const int lane = threadIdx.x & 31;
  const int gl = lane & (G - 1);  // lane within the group
  const int grp = lane / G;       // group within the warp
  const i64 rows = p.B * p.C;
  const i64 warps_per_block = kGemvThreads / 32;
  const i64 warp = static_cast<i64>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
  const i64 warp_step = static_cast<i64>(gridDim.x) * warps_per_block * kRowsPerWarp;
  // The loop bound is the same for the whole warp, so every lane reaches the shuffles.
  for (i64 base = warp * kRowsPerWarp; base < rows; base += warp_step) {
    const i64 row = base + grp;
    const bool valid = row < rows;
    i64 b = 0, c = 0;
    float acc = 0.0f;
    if (valid) {
      b = row / p.C;
      c = row - b * p.C;
      const T* xp = static_cast<const T*>(p.x) + b * p.sxb;
      const T* wp = static_cast<const T*>(p.w) + b * p.swb + c * p.swc;
      if constexpr (VEC) {
        const i64 nvec = p.D / kVecElems;
        const uint4* xv = reinterpret_cast<const uint4*>(xp);
        const uint4* wv = reinterpret_cast<const uint4*>(wp);
#pragma unroll 4
        for (i64 v = gl; v < nvec; v += G) acc = dot16<T>(__ldg(wv + v), __ldg(xv + v), acc);
        for (i64 d = nvec * kVecElems + gl; d < p.D; d += G) acc = fmaf(ld(xp + d), ld(wp + d), acc);
      } else {
#pragma unroll 4
        for (i64 d = gl; d < p.D; d += G) acc = fmaf(ld(xp + d * p.sxd), ld(wp + d * p.swd), acc);
      }
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
    if (valid && gl == 0) gemv_store<T>(p, b, c, acc);
  }
}

// Output dim contiguous, reduction strided: lane tx owns output c = c0 + tx (coalesced across
// the warp), warp ty sums d = ty, ty + 8, ...; the 8 partials are added in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kGemvThreads) gemv_cols_kernel(const GemvParams p) {
  constexpr int kWarps = kGemvThreads / 32;
  __shared__ float red[kWarps][33];
  const int tx = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const i64 tiles_c = (p.C + 31) / 32;
  const i64 total = p.B * tiles_c;
  for (i64 t = blockIdx.x; t < total; t += gridDim.x) {
    const i64 b = t / tiles_c;
    const i64 c = (t - b * tiles_c) * 32 + tx;
    float acc = 0.0f;
    if (c < p.C) {
      const T* xp = static_cast<const T*>(p.x) + b * p.sxb;
      const T* wp = static_cast<const T*>(p.w) + b * p.swb + c * p.swc;
#pragma unroll 4
      for (i64 d = ty; d < p.D; d += kWarps) acc = fmaf(ld(xp + d * p.sxd), ld(wp + d * p.swd), acc);
    }
    red[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < p.C) {
      float sum = 0.0f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) sum += red[k][tx];
      gemv_store<T>(p, b, c, sum);
    }
    __syncthreads();  // red is rewritten by the next tile
  }
}

template <typename T>
void launch_gemv_typed(const GemvParams& p, cudaStream_t stream, const char* op) {
  if (p.B == 0 || p.C == 0) return;
  constexpr int kElem = static_cast<int>(sizeof(T));
  constexpr int kVecElems = 16 / kElem;
  const bool rows_variant = p.swd == 1 || p.swc != 1 || p.C == 1;
  if (!rows_variant) {
    const i64 blocks = p.B * ceil_div(p.C, 32);
    gemv_cols_kernel<T><<<grid_size(blocks), kGemvThreads, 0, stream>>>(p);
    after_launch<T>(op, "gemv_cols_kernel");
    return;
  }
  const bool vec = p.swd == 1 && p.sxd == 1 && aligned16(reinterpret_cast<std::uintptr_t>(p.x)) &&
                   aligned16(reinterpret_cast<std::uintptr_t>(p.w)) &&
                   stride_ok16(p.sxb, p.B, kElem) && stride_ok16(p.swb, p.B, kElem) &&
                   stride_ok16(p.swc, p.C, kElem);
  // Lanes per output: enough to cover the row in one pass, at least 4 (a row's loads then span
  // at least 64 bytes), at most a warp.
  const i64 units = vec ? ceil_div(p.D, kVecElems) : p.D;
  int g = 4;
  while (g < 32 && g < units) g *= 2;
  dispatch_group_size(g, [&](auto gc) {
    constexpr int kG = decltype(gc)::value;
    const i64 blocks = ceil_div(p.B * p.C, kGemvThreads / kG);
    dispatch_bool(vec, [&](auto vc) {
      constexpr bool kVec = decltype(vc)::value;
      gemv_rows_kernel<T, kG, kVec><<<grid_size(blocks), kGemvThreads, 0, stream>>>(p);
      after_launch<T>(op, "gemv_rows_kernel");
    });
  });
}

}  // namespace

void launch_gemv(int dtype, const GemvParams& p, cudaStream_t stream, const char* op) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch_gemv_typed<typename decltype(tag)::type>(p, stream, op);
  });
}

}  // namespace hk
