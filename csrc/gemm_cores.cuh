// The GEMM's shared-memory tile and the math cores that consume it (gemm.cu runs the pipeline).
//
// A CTA of kGemmThreads computes one kTile x kTile output tile. Each pipeline stage holds an A
// tile [kTile rows][kTileD d] and a W tile [kTile cols][kTileD d] in shared memory, rows padded
// to kLds elements; a core accumulates one stage, then stages its float accumulators for the
// epilogue. The cores are apart from the pipeline because they are the only part that differs
// between float32 on CUDA cores (CoreFma) and tensor cores (CoreWmma: float16 / bfloat16, or
// float32 as TF32), while the loads, the double buffering and the epilogue are shared.
#pragma once

#include <mma.h>

#include <type_traits>

#include "kernels.h"

namespace hk {

constexpr int kGemmThreads = 128;  // 4 warps, 2 x 2 over the output tile
constexpr int kLdc = kTile + 4;    // float stride of the epilogue staging tile (16-byte rows)

enum MathMode : int {
  kMathFma = 0,   // float32 CUDA cores
  kMathWmma = 1,  // float16 / bfloat16 tensor cores, float32 accumulate
  kMathTf32 = 2,  // float32 data on TF32 tensor cores, float32 accumulate
};

template <int ELEM>
struct GemmSmem {
  static constexpr int kVec = 16 / ELEM;  // elements per 16-byte chunk
  // Row stride in elements (kTileD + one chunk): a multiple of 16 bytes (16-byte stores, WMMA
  // ldm rules) that staggers successive rows across banks (80 B or 144 B).
  static constexpr int kLds = kTileD + kVec;
  static constexpr int kRowBytes = kLds * ELEM;
  static constexpr int kOperandBytes = kTile * kRowBytes;
  static constexpr int kStageBytes = 2 * kOperandBytes;  // A tile, then W tile
  static constexpr int kPipeBytes = 2 * kStageBytes;     // double buffered
  static constexpr int kEpiBytes = kTile * kLdc * 4;     // float staging of the output tile
  static constexpr int kBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static constexpr int kChunksPerRow = kTileD / kVec;
  static constexpr int kChunksPerThread = kTile * kChunksPerRow / kGemmThreads;
  static_assert(kTile * kChunksPerRow % kGemmThreads == 0, "tile chunks must split evenly");
  static_assert(kRowBytes % 16 == 0, "smem rows must be 16-byte multiples");
  static_assert((16 * kRowBytes) % 32 == 0, "WMMA fragments need 32-byte aligned pointers");
  static_assert(kOperandBytes % 128 == 0, "operand tiles keep 128-byte alignment");
};

// ---- math cores: accumulate one stage (kTileD) of A [kTile][kLds] x W [kTile][kLds]^T, then
// ---- stage the float accumulators into cs (row-major [r][kLdc], or col-major [c][kLdc]).

// float32 on CUDA cores. Thread (tx, ty) owns rows ty + 8 i and cols tx + 16 j; a warp spans 4
// ty x 8 tx so its float4 shared loads are conflict-free (row stride 36 words).
struct CoreFma {
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  __device__ __forceinline__ static int tx() {
    return ((threadIdx.x >> 5) & 1) * 8 + (threadIdx.x & 7);
  }
  __device__ __forceinline__ static int ty() {
    return (threadIdx.x >> 6) * 4 + ((threadIdx.x & 31) >> 3);
  }
  __device__ __forceinline__ void step(const char* a_tile, const char* w_tile) {
    constexpr int kLds = GemmSmem<4>::kLds;
    const float* as = reinterpret_cast<const float*>(a_tile);
    const float* ws = reinterpret_cast<const float*>(w_tile);
    const int x = tx(), y = ty();
#pragma unroll
    for (int kk = 0; kk < kTileD; kk += 4) {
      float4 a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = *reinterpret_cast<const float4*>(as + (y + 8 * i) * kLds + kk);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(ws + (x + 16 * j) * kLds + kk);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float s = acc[i][j];
          s = fmaf(a[i].x, b[j].x, s);
          s = fmaf(a[i].y, b[j].y, s);
          s = fmaf(a[i].z, b[j].z, s);
          s = fmaf(a[i].w, b[j].w, s);
          acc[i][j] = s;
        }
    }
  }
  __device__ __forceinline__ void stage(float* cs, int col_major) const {
    const int x = tx(), y = ty();
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = y + 8 * i, c = x + 16 * j;
        cs[col_major ? c * kLdc + r : r * kLdc + c] = acc[i][j];
      }
  }
};

// Tensor cores through WMMA. Warp (wr, wc) owns the 32 x 32 block at (32 wr, 32 wc): 2 x 2
// fragments of 16 x 16. A is matrix_a row-major ([r][d]); W [c][d] read as matrix_b col-major
// is exactly B[d][c] = W[c][d].
template <typename T, int MATH>
struct CoreWmma {
  static_assert(MATH == kMathWmma || MATH == kMathTf32, "tensor-core math only");
  static constexpr int kFragK = MATH == kMathTf32 ? 8 : 16;
  using AType = std::conditional_t<MATH == kMathTf32, nvcuda::wmma::precision::tf32, T>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float>;
  using FragA =
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kFragK, AType, nvcuda::wmma::row_major>;
  using FragB =
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kFragK, AType, nvcuda::wmma::col_major>;

  Acc acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const char* a_tile, const char* w_tile) {
    constexpr int kLds = GemmSmem<sizeof(T)>::kLds;
    const T* as = reinterpret_cast<const T*>(a_tile);
    const T* ws = reinterpret_cast<const T*>(w_tile);
    const int warp = threadIdx.x >> 5;
    const int wr = warp >> 1, wc = warp & 1;
#pragma unroll
    for (int kk = 0; kk < kTileD; kk += kFragK) {
      FragA fa[2];
      FragB fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        nvcuda::wmma::load_matrix_sync(fa[i], as + (wr * 32 + i * 16) * kLds + kk, kLds);
        if constexpr (MATH == kMathTf32) {
#pragma unroll
          for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = nvcuda::wmma::__float_to_tf32(fa[i].x[t]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::load_matrix_sync(fb[j], ws + (wc * 32 + j * 16) * kLds + kk, kLds);
        if constexpr (MATH == kMathTf32) {
#pragma unroll
          for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = nvcuda::wmma::__float_to_tf32(fb[j].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void stage(float* cs, int col_major) const {
    const int warp = threadIdx.x >> 5;
    const int wr = warp >> 1, wc = warp & 1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = wr * 32 + i * 16, c = wc * 32 + j * 16;
        if (col_major) {
          nvcuda::wmma::store_matrix_sync(cs + c * kLdc + r, acc[i][j], kLdc, nvcuda::wmma::mem_col_major);
        } else {
          nvcuda::wmma::store_matrix_sync(cs + r * kLdc + c, acc[i][j], kLdc, nvcuda::wmma::mem_row_major);
        }
      }
  }
};

template <typename T, int MATH>
struct CoreFor {
  using type = CoreWmma<T, MATH>;
};
template <>
struct CoreFor<float, kMathFma> {
  using type = CoreFma;
};

}  // namespace hk
