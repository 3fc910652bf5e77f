// Batched (per-sample) linear layer: kernels and launchers.
//
//   forward : z[b,n,m] = sum_k x[b,n,k] w[b,m,k] + bias[b,m];   y = act(z)
//   backward: dz = dy * act'(z);   dx[b,n,k] = sum_m dz[b,n,m] w[b,m,k]
//             dw[b,m,k] = sum_n dz[b,n,m] x[b,n,k];   db[b,m] = sum_n dz[b,n,m]
//
// Every tensor is addressed through (batch, row, col) strides in elements; nothing is assumed
// contiguous, any stride may be 0 (a weight shared by every sample is an expand with batch
// stride 0). All index arithmetic is 64-bit. Grids are 1-D (blockIdx.x up to 2^31 - 1) and
// every kernel walks its work items with a block-stride loop, so no size can overflow a grid
// dimension. Accumulation is float32; outputs are stored in the input dtype (round to nearest).
//
// The kernels are written once over a generic "batched GEMM"
//     out[b, r, c] = epilogue( sum_d A[b, r, d] * W[b, c, d] )
// and each use maps its operands onto it by passing strides:
//     forward  : A = x (r = n, d = k),        W = w   (c = m, d = k)
//     dx       : A = dz (r = n, d = m),       W = w^T (c = k, d = m): strides (swb, swk, swm)
//     dw       : A = dz^T (r = m, d = n),     W = x^T (c = k, d = n)
// Paths:
//   * N == 1 forward / dx: GEMV kernels (memory-bound, the floor is reading every weight once)
//       - gemv_rows_kernel: G lanes per output (G in 4..32, several outputs per warp for small
//         widths), 16-byte vector loads when the reduction dim is contiguous and aligned,
//         warp-shuffle reduction;
//       - gemv_cols_kernel: when instead the output dim is contiguous (dx = dz @ w with a
//         row-major w), lanes run along outputs (coalesced) and 8 warps split the reduction.
//   * N == 1 dw: outer product dz[b]^T x[b], write-once (outer_kernel).
//   * N > 1: gemm_kernel, a 64 x 64 x 32 tile per CTA (4 warps), double-buffered shared
//     memory fed through registers (global loads of the next stage overlap the math of the
//     current one), WMMA tensor cores for float16 / bfloat16 (and float32 when TF32 is
//     allowed), a plain FMA tile otherwise; epilogue staged through shared memory so the global
//     stores are coalesced along whichever output dim is contiguous.
//   * dz (and db, fused: it is the column sum of dz) in dz_db kernels; dw with a long
//     reduction is split over N across CTAs into a float32 workspace, then summed in a fixed
//     order (deterministic) by reduce_splits_kernel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "activations.cuh"
#include "batched_linear.h"
#include "checks.h"
#include "dispatch.h"

namespace hk {
namespace {

using i64 = int64_t;

// ---------------------------------------------------------------------------------------------
// Element access: loads convert to float32, stores round from float32.
// Inputs are read through the read-only path (__ldg): no kernel writes a buffer it reads.
// ---------------------------------------------------------------------------------------------

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
__device__ __forceinline__ uint32_t ld_bits(const char* base, i64 off) {
  if constexpr (ELEM == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(base) + off);
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(base) + off);
  }
}

// ---------------------------------------------------------------------------------------------
// GEMV (N == 1): out[b, c] = act(sum_d x[b, d] * w[b, c, d] + bias[b, c])
// ---------------------------------------------------------------------------------------------

struct GemvParams {
  const void* x;  // vector operand x[b, d]
  i64 sxb, sxd;
  const void* w;  // matrix operand w[b, c, d]
  i64 swb, swc, swd;
  const void* bias;  // bias[b, c] or null
  i64 sbb, sbc;
  void* out;  // out[b, c]
  i64 sob, soc;
  void* pre;  // preact, same strides as out, or null
  i64 B, C, D;
  int act;
  float w0;
};

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

// ---------------------------------------------------------------------------------------------
// Tiled batched GEMM (N > 1):
//   out[b, r, c] = act(sum_{d in split} A[b, r, d] W[b, c, d] + bias[b, c])
// ---------------------------------------------------------------------------------------------

constexpr int kGemmThreads = 128;  // 4 warps, 2 x 2 over the output tile
constexpr int kTile = 64;          // output tile: kTile rows x kTile cols per CTA
constexpr int kTileD = 32;         // reduction depth of one pipeline stage
constexpr int kLdc = kTile + 4;    // float stride of the epilogue staging tile (16-byte rows)

// How a thread block reads an operand tile (rows x kTileD) from global memory; chosen on the
// host from the strides. Every mode packs 16 bytes = one chunk of consecutive d of one row
// into a register and stores it into shared memory as [row][d] with one 16-byte store.
enum LoadMode : int {
  kLoadDFast = 0,  // scalar loads, consecutive threads along d (d contiguous but unaligned, or
                   // neither dim contiguous)
  kLoadVec = 1,    // 16-byte vector loads along d (sd == 1, aligned)
  kLoadRFast = 2,  // scalar loads, consecutive threads along rows (sr == 1): coalesced
};

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

struct GemmParams {
  const void* a;  // A[b, r, d]
  i64 sab, sar, sad;
  const void* w;  // W[b, c, d]
  i64 swb, swc, swd;
  const void* bias;  // bias[b, c] or null
  i64 sbb, sbc;
  void* out;  // out[b, r, c]
  i64 sob, sor, soc;
  void* pre;  // preact (same strides as out) or null
  float* ws;  // splits > 1: raw partial sums ws[((s * B + b) * R + r) * C + c]; no epilogue
  i64 B, R, C, D;
  i64 d_chunk;  // reduction length per split (a multiple of kTileD unless splits == 1)
  i64 splits;
  int act;
  float w0;
  int a_mode, w_mode;  // LoadMode of A and W
  int out_r_fast;      // 1: output stores run along r (sor == 1), else along c
};

// Chunk v of this thread -> (row, chunk index along d) of the tile.
template <int ELEM>
__device__ __forceinline__ void chunk_coords(int mode, int v, int& row, int& kc) {
  using S = GemmSmem<ELEM>;
  const int id = static_cast<int>(threadIdx.x) + v * kGemmThreads;
  if (mode == kLoadRFast) {
    row = id % kTile;
    kc = id / kTile;
  } else {
    row = id / S::kChunksPerRow;
    kc = id % S::kChunksPerRow;
  }
}

// Global -> registers: this thread's chunks of rows [r0, r0 + kTile) x d [d0, d0 + kTileD) of
// an operand with `rows` rows whose reduction range ends at d_end; out-of-range elements are 0.
template <int ELEM>
__device__ __forceinline__ void load_tile(uint4 (&regs)[GemmSmem<ELEM>::kChunksPerThread],
                                          const char* base, i64 sr, i64 sd, i64 rows, i64 r0,
                                          i64 d0, i64 d_end, int mode) {
  using S = GemmSmem<ELEM>;
#pragma unroll
  for (int v = 0; v < S::kChunksPerThread; ++v) {
    int row, kc;
    chunk_coords<ELEM>(mode, v, row, kc);
    const i64 gr = r0 + row;
    const i64 gd = d0 + static_cast<i64>(kc) * S::kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (gr < rows && gd < d_end) {
      const char* rp = base + gr * sr * ELEM;
      if (mode == kLoadVec && gd + S::kVec <= d_end) {
        val = __ldg(reinterpret_cast<const uint4*>(rp + gd * ELEM));  // sd == 1, aligned
      } else {
        uint32_t wd[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if constexpr (ELEM == 4) {
            const i64 d = gd + j;
            wd[j] = d < d_end ? ld_bits<4>(rp, d * sd) : 0u;
          } else {
            const i64 d = gd + 2 * j;
            const uint32_t lo = d < d_end ? ld_bits<2>(rp, d * sd) : 0u;
            const uint32_t hi = d + 1 < d_end ? ld_bits<2>(rp, (d + 1) * sd) : 0u;
            wd[j] = lo | (hi << 16);
          }
        }
        val = make_uint4(wd[0], wd[1], wd[2], wd[3]);
      }
    }
    regs[v] = val;
  }
}

// Registers -> shared memory tile [kTile][kLds].
template <int ELEM>
__device__ __forceinline__ void store_tile(char* tile,
                                           const uint4 (&regs)[GemmSmem<ELEM>::kChunksPerThread],
                                           int mode) {
  using S = GemmSmem<ELEM>;
#pragma unroll
  for (int v = 0; v < S::kChunksPerThread; ++v) {
    int row, kc;
    chunk_coords<ELEM>(mode, v, row, kc);
    *reinterpret_cast<uint4*>(tile + row * S::kRowBytes + kc * 16) = regs[v];
  }
}

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

template <typename T>
__device__ __forceinline__ void gemm_epilogue(const GemmParams& p, const float* cs, i64 b, i64 s,
                                              i64 r0, i64 c0) {
  constexpr int kPerThread = kTile * kTile / kGemmThreads;
#pragma unroll 4
  for (int e = 0; e < kPerThread; ++e) {
    const int id = static_cast<int>(threadIdx.x) + e * kGemmThreads;
    int r, c;
    if (p.out_r_fast) {
      r = id % kTile;
      c = id / kTile;
    } else {
      r = id / kTile;
      c = id % kTile;
    }
    const i64 gr = r0 + r, gc = c0 + c;
    if (gr >= p.R || gc >= p.C) continue;
    float v = cs[p.out_r_fast ? c * kLdc + r : r * kLdc + c];
    if (p.splits > 1) {
      p.ws[((s * p.B + b) * p.R + gr) * p.C + gc] = v;
      continue;
    }
    if (p.bias != nullptr) v += ld(static_cast<const T*>(p.bias) + b * p.sbb + gc * p.sbc);
    const i64 off = b * p.sob + gr * p.sor + gc * p.soc;
    if (p.pre != nullptr) st(static_cast<T*>(p.pre) + off, v);
    st(static_cast<T*>(p.out) + off, act_forward(p.act, v, p.w0));
  }
}

template <typename T, int MATH>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const GemmParams p) {
  constexpr int ELEM = static_cast<int>(sizeof(T));
  using S = GemmSmem<ELEM>;
  using Core = typename CoreFor<T, MATH>::type;
  __shared__ __align__(128) char smem[S::kBytes];

  const i64 tiles_r = (p.R + kTile - 1) / kTile;
  const i64 tiles_c = (p.C + kTile - 1) / kTile;
  const i64 total = p.B * tiles_r * tiles_c * p.splits;
  for (i64 t = blockIdx.x; t < total; t += gridDim.x) {
    // c-tile fastest: neighbouring CTAs share the A rows (x tile) of one sample through L2.
    i64 q = t;
    const i64 tc = q % tiles_c;
    q /= tiles_c;
    const i64 tr = q % tiles_r;
    q /= tiles_r;
    const i64 s = q % p.splits;
    const i64 b = q / p.splits;
    const i64 r0 = tr * kTile, c0 = tc * kTile;
    const i64 d_begin = s * p.d_chunk;
    const i64 d_end = (p.D - d_begin < p.d_chunk) ? p.D : d_begin + p.d_chunk;
    const i64 nsteps = d_end > d_begin ? (d_end - d_begin + kTileD - 1) / kTileD : 0;
    const char* a_base = static_cast<const char*>(p.a) + b * p.sab * ELEM;
    const char* w_base = static_cast<const char*>(p.w) + b * p.swb * ELEM;

    Core core;
    core.zero();
    uint4 ra[S::kChunksPerThread], rw[S::kChunksPerThread];
    if (nsteps > 0) {
      load_tile<ELEM>(ra, a_base, p.sar, p.sad, p.R, r0, d_begin, d_end, p.a_mode);
      load_tile<ELEM>(rw, w_base, p.swc, p.swd, p.C, c0, d_begin, d_end, p.w_mode);
      store_tile<ELEM>(smem, ra, p.a_mode);
      store_tile<ELEM>(smem + S::kOperandBytes, rw, p.w_mode);
    }
    __syncthreads();
    for (i64 step = 0; step < nsteps; ++step) {
      const int cur = static_cast<int>(step & 1);
      const bool has_next = step + 1 < nsteps;
      if (has_next) {  // issue the next stage's global loads before this stage's math
        const i64 dn = d_begin + (step + 1) * kTileD;
        load_tile<ELEM>(ra, a_base, p.sar, p.sad, p.R, r0, dn, d_end, p.a_mode);
        load_tile<ELEM>(rw, w_base, p.swc, p.swd, p.C, c0, dn, d_end, p.w_mode);
      }
      char* stage = smem + cur * S::kStageBytes;
      core.step(stage, stage + S::kOperandBytes);
      if (has_next) {
        // The other buffer was last read in step - 1, which every thread finished before the
        // barrier that closed step - 1.
        char* next = smem + (cur ^ 1) * S::kStageBytes;
        store_tile<ELEM>(next, ra, p.a_mode);
        store_tile<ELEM>(next + S::kOperandBytes, rw, p.w_mode);
      }
      __syncthreads();
    }
    // The staging tile aliases the pipeline buffers: the barrier above ended every read.
    float* cs = reinterpret_cast<float*>(smem);
    core.stage(cs, p.out_r_fast);
    __syncthreads();
    gemm_epilogue<T>(p, cs, b, s, r0, c0);
    __syncthreads();  // the next tile's prologue overwrites cs
  }
}

// ---------------------------------------------------------------------------------------------
// Backward elementwise part: dz = dy * act'(saved), optional store of dz, and the fused column
// sum db[b, m] = sum_{n in split} dz[b, n, m] (written directly, or as float partials per split).
// ---------------------------------------------------------------------------------------------

struct DzParams {
  const void* dy;
  i64 sdyb, sdyn, sdym;
  const void* sv;  // preact z or output y; unused (may be null) for act == none
  i64 ssb, ssn, ssm;
  int sv_is_preact;
  void* dz;  // null: dz is not stored
  i64 sdzb, sdzn, sdzm;
  void* db;  // null: no column sums
  i64 sdbb, sdbm;
  float* ws;  // splits > 1 and db: partials ws[(s * B + b) * M + m]
  i64 B, N, M;
  i64 n_chunk, splits;
  int act;
  float w0;
};

constexpr int kDzThreads = 256;

template <typename T>
__device__ __forceinline__ float dz_value(const DzParams& p, i64 b, i64 n, i64 m) {
  float g = ld(static_cast<const T*>(p.dy) + b * p.sdyb + n * p.sdyn + m * p.sdym);
  if (p.act != kActNone) {
    const float v = ld(static_cast<const T*>(p.sv) + b * p.ssb + n * p.ssn + m * p.ssm);
    g *= p.sv_is_preact ? act_grad_from_preact(p.act, v, p.w0) : act_grad_from_output(p.act, v);
  }
  if (p.dz != nullptr) st(static_cast<T*>(p.dz) + b * p.sdzb + n * p.sdzn + m * p.sdzm, g);
  return g;
}

template <typename T>
__device__ __forceinline__ void db_store(const DzParams& p, i64 s, i64 b, i64 m, float sum) {
  if (p.splits > 1) {
    p.ws[(s * p.B + b) * p.M + m] = sum;
  } else {
    st(static_cast<T*>(p.db) + b * p.sdbb + m * p.sdbm, sum);
  }
}

// m contiguous (or nothing is): lane tx owns m = 32 mt + tx, warp ty walks n = ty, ty + 8, ...
template <typename T>
__global__ void __launch_bounds__(kDzThreads) dz_db_mfast_kernel(const DzParams p) {
  constexpr int kWarps = kDzThreads / 32;
  __shared__ float red[kWarps][33];
  const int tx = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const i64 tiles_m = (p.M + 31) / 32;
  const i64 total = p.B * tiles_m * p.splits;
  for (i64 t = blockIdx.x; t < total; t += gridDim.x) {
    i64 q = t;
    const i64 mt = q % tiles_m;
    q /= tiles_m;
    const i64 s = q % p.splits;
    const i64 b = q / p.splits;
    const i64 m = mt * 32 + tx;
    const i64 n0 = s * p.n_chunk;
    const i64 n1 = (p.N - n0 < p.n_chunk) ? p.N : n0 + p.n_chunk;
    float acc = 0.0f;
    if (m < p.M) {
      for (i64 n = n0 + ty; n < n1; n += kWarps) acc += dz_value<T>(p, b, n, m);
    }
    if (p.db != nullptr) {
      red[ty][tx] = acc;
      __syncthreads();
      if (ty == 0 && m < p.M) {
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < kWarps; ++k) sum += red[k][tx];
        db_store<T>(p, s, b, m, sum);
      }
      __syncthreads();
    }
  }
}

// n contiguous (e.g. the channel-major conv layout): warp ty owns m = 8 mt + ty, its lanes
// walk n = lane, lane + 32, ...; warp-shuffle sum.
template <typename T>
__global__ void __launch_bounds__(kDzThreads) dz_db_nfast_kernel(const DzParams p) {
  constexpr int kWarps = kDzThreads / 32;
  const int lane = threadIdx.x & 31;
  const int ty = threadIdx.x >> 5;
  const i64 tiles_m = (p.M + kWarps - 1) / kWarps;
  const i64 total = p.B * tiles_m * p.splits;
  for (i64 t = blockIdx.x; t < total; t += gridDim.x) {
    i64 q = t;
    const i64 mt = q % tiles_m;
    q /= tiles_m;
    const i64 s = q % p.splits;
    const i64 b = q / p.splits;
    const i64 m = mt * kWarps + ty;  // the same for the whole warp
    const i64 n0 = s * p.n_chunk;
    const i64 n1 = (p.N - n0 < p.n_chunk) ? p.N : n0 + p.n_chunk;
    float acc = 0.0f;
    if (m < p.M) {
      for (i64 n = n0 + lane; n < n1; n += 32) acc += dz_value<T>(p, b, n, m);
    }
    if (p.db != nullptr) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
      if (lane == 0 && m < p.M) db_store<T>(p, s, b, m, acc);
    }
  }
}

// dw for N == 1: dw[b, m, k] = dz[b, m] * x[b, k]; K_FAST: consecutive threads along k.
template <typename T, bool K_FAST>
__global__ void __launch_bounds__(256)
    outer_kernel(const T* __restrict__ dz, i64 sdzb, i64 sdzm, const T* __restrict__ x, i64 sxb,
                 i64 sxk, T* __restrict__ dw, i64 sdwb, i64 sdwm, i64 sdwk, i64 B, i64 M, i64 K) {
  const i64 total = B * M * K;
  const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    i64 b, m, k;
    if (K_FAST) {
      k = i % K;
      const i64 q = i / K;
      m = q % M;
      b = q / M;
    } else {
      m = i % M;
      const i64 q = i / M;
      k = q % K;
      b = q / K;
    }
    st(dw + b * sdwb + m * sdwm + k * sdwk, ld(dz + b * sdzb + m * sdzm) * ld(x + b * sxb + k * sxk));
  }
}

// out[b, r, c] = sum_s ws[((s * B + b) * R + r) * C + c], summed in split order.
template <typename T>
__global__ void __launch_bounds__(256)
    reduce_splits_kernel(const float* __restrict__ ws, i64 splits, i64 B, i64 R, i64 C,
                         T* __restrict__ out, i64 sob, i64 sor, i64 soc) {
  const i64 total = B * R * C;
  const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    float acc = 0.0f;
    for (i64 s = 0; s < splits; ++s) acc += ws[s * total + i];
    const i64 c = i % C;
    const i64 q = i / C;
    const i64 r = q % R;
    const i64 b = q / R;
    st(out + b * sob + r * sor + c * soc, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning and launchers.
// ---------------------------------------------------------------------------------------------

constexpr i64 kMaxGridX = 2147483647;  // gridDim.x limit (blockIdx.y / z are never used)
// Split a long reduction until about this many CTAs exist: a few waves on any current GPU
// (108 SMs on A100, 132 on H100). A constant (not the SM count) keeps the split, and so the
// float32 summation order, the same on every device.
constexpr i64 kTargetCtas = 512;
constexpr i64 kMaxSplits = 64;
constexpr i64 kMinGemmSplitLen = 4 * kTileD;  // dw GEMM: at least 4 pipeline stages per split
constexpr i64 kMinDzSplitLen = 64;            // dz / db: at least 64 rows per split

i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

unsigned grid_size(i64 blocks) {
  return static_cast<unsigned>(std::max<i64>(1, std::min(blocks, kMaxGridX)));
}

const char* type_name(float) { return "float32"; }
const char* type_name(__half) { return "float16"; }
const char* type_name(__nv_bfloat16) { return "bfloat16"; }

// After every launch: cudaGetLastError, and on failure an exception naming op, kernel and dtype
// (the message is only built on failure).
template <typename T>
void after_launch(const char* op, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw_cuda_error(err, std::string(op) + ", launch of " + kernel + "<" + type_name(T{}) + ">");
  }
}

// 16-byte alignment of a pointer + every stride of a dim with extent > 1 (extent 1: never used).
bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }
bool stride_ok16(i64 stride, i64 extent, int elem) { return extent <= 1 || (stride * elem) % 16 == 0; }

// How the GEMM reads an operand [b, r, d] (see LoadMode).
int load_mode(std::uintptr_t ptr, i64 sb, i64 nb, i64 sr, i64 nr, i64 sd, int elem) {
  if (sd == 1) {
    const bool aligned = aligned16(ptr) && stride_ok16(sb, nb, elem) && stride_ok16(sr, nr, elem);
    return aligned ? kLoadVec : kLoadDFast;
  }
  return sr == 1 ? kLoadRFast : kLoadDFast;
}

struct SplitPlan {
  i64 splits = 1;
  i64 chunk = 0;  // reduction length per split
};

// Split a reduction of length `len` over `tiles` independent output tiles.
SplitPlan plan_split(i64 tiles, i64 len, i64 min_len, i64 align) {
  SplitPlan plan;
  if (len <= 0) return plan;  // nothing to reduce: one split of length 0
  i64 splits = ceil_div(kTargetCtas, std::max<i64>(tiles, 1));
  splits = std::min(splits, std::max<i64>(1, len / min_len));
  splits = std::max<i64>(1, std::min(splits, kMaxSplits));
  i64 chunk = ceil_div(ceil_div(len, splits), align) * align;
  plan.splits = ceil_div(len, chunk);  // no empty split
  plan.chunk = plan.splits == 1 ? len : chunk;
  return plan;
}

SplitPlan plan_dw(i64 B, i64 N, i64 M, i64 K) {
  if (N == 1) return SplitPlan{1, 1};  // outer product, no reduction
  return plan_split(B * ceil_div(M, kTile) * ceil_div(K, kTile), N, kMinGemmSplitLen, kTileD);
}

SplitPlan plan_dz(i64 B, i64 N, i64 M) {
  return plan_split(B * ceil_div(M, 32), N, kMinDzSplitLen, 1);
}

struct WorkspaceLayout {
  i64 dw_offset = 0, dw_bytes = 0;
  i64 db_offset = 0, db_bytes = 0;
  i64 total = 0;
};

WorkspaceLayout workspace_layout(i64 B, i64 N, i64 M, i64 K, bool need_dw, bool need_db) {
  WorkspaceLayout lay;
  const SplitPlan pw = plan_dw(B, N, M, K);
  const SplitPlan pz = plan_dz(B, N, M);
  if (need_dw && pw.splits > 1) lay.dw_bytes = pw.splits * B * M * K * 4;
  if (need_db && pz.splits > 1) lay.db_bytes = pz.splits * B * M * 4;
  lay.db_offset = ceil_div(lay.dw_bytes, 256) * 256;
  lay.total = lay.db_bytes > 0 ? lay.db_offset + lay.db_bytes : lay.dw_bytes;
  return lay;
}

template <typename T>
void launch_gemv(const GemvParams& p, cudaStream_t stream, const char* op) {
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

template <typename T>
void launch_gemm(const GemmParams& p, bool allow_tf32, cudaStream_t stream, const char* op) {
  if (p.B == 0 || p.R == 0 || p.C == 0) return;
  const i64 blocks = p.B * ceil_div(p.R, kTile) * ceil_div(p.C, kTile) * p.splits;
  if constexpr (std::is_same<T, float>::value) {
    if (allow_tf32) {
      gemm_kernel<float, kMathTf32><<<grid_size(blocks), kGemmThreads, 0, stream>>>(p);
      after_launch<T>(op, "gemm_kernel[tf32]");
    } else {
      gemm_kernel<float, kMathFma><<<grid_size(blocks), kGemmThreads, 0, stream>>>(p);
      after_launch<T>(op, "gemm_kernel[fma]");
    }
  } else {
    (void)allow_tf32;
    gemm_kernel<T, kMathWmma><<<grid_size(blocks), kGemmThreads, 0, stream>>>(p);
    after_launch<T>(op, "gemm_kernel[wmma]");
  }
}

template <typename T>
void launch_reduce_splits(const float* ws, i64 splits, i64 B, i64 R, i64 C, void* out, i64 sob,
                          i64 sor, i64 soc, cudaStream_t stream, const char* op) {
  const i64 total = B * R * C;
  if (total == 0) return;
  reduce_splits_kernel<T><<<grid_size(ceil_div(total, 256)), 256, 0, stream>>>(
      ws, splits, B, R, C, static_cast<T*>(out), sob, sor, soc);
  after_launch<T>(op, "reduce_splits_kernel");
}

const void* cptr(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check_common(int dtype, int act, i64 B, i64 N, i64 M, i64 K) {
  check_dtype(dtype);
  require(act >= 0 && act < kNumActs,
          "act code must be in [0, " + std::to_string(kNumActs) + "), got " + std::to_string(act));
  require(B >= 0 && N >= 0 && M >= 0 && K >= 0,
          "sizes must be >= 0, got B=" + std::to_string(B) + " N=" + std::to_string(N) +
              " M=" + std::to_string(M) + " K=" + std::to_string(K));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

void linear_forward(const LinearForwardArgs& a) {
  check_common(a.dtype, a.act, a.B, a.N, a.M, a.K);
  if (a.B == 0 || a.N == 0 || a.M == 0) return;  // empty output
  require(a.y != 0, "linear_forward: y must not be null");
  require(a.K == 0 || (a.x != 0 && a.w != 0), "linear_forward: x and w must not be null");
  check_no_pending_error("linear_forward");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.N == 1) {
      GemvParams p{};
      p.x = cptr(a.x), p.sxb = a.sxb, p.sxd = a.sxk;
      p.w = cptr(a.w), p.swb = a.swb, p.swc = a.swm, p.swd = a.swk;
      p.bias = cptr(a.bias), p.sbb = a.sbb, p.sbc = a.sbm;
      p.out = mptr(a.y), p.sob = a.syb, p.soc = a.sym;
      p.pre = mptr(a.preact);
      p.B = a.B, p.C = a.M, p.D = a.K;
      p.act = a.act, p.w0 = a.w0;
      launch_gemv<T>(p, stream, "linear_forward");
    } else {
      constexpr int kElem = static_cast<int>(sizeof(T));
      GemmParams p{};
      p.a = cptr(a.x), p.sab = a.sxb, p.sar = a.sxn, p.sad = a.sxk;
      p.w = cptr(a.w), p.swb = a.swb, p.swc = a.swm, p.swd = a.swk;
      p.bias = cptr(a.bias), p.sbb = a.sbb, p.sbc = a.sbm;
      p.out = mptr(a.y), p.sob = a.syb, p.sor = a.syn, p.soc = a.sym;
      p.pre = mptr(a.preact);
      p.ws = nullptr;
      p.B = a.B, p.R = a.N, p.C = a.M, p.D = a.K;
      p.d_chunk = a.K, p.splits = 1;
      p.act = a.act, p.w0 = a.w0;
      p.a_mode = load_mode(a.x, a.sxb, a.B, a.sxn, a.N, a.sxk, kElem);
      p.w_mode = load_mode(a.w, a.swb, a.B, a.swm, a.M, a.swk, kElem);
      p.out_r_fast = (a.syn == 1 && a.sym != 1) ? 1 : 0;
      launch_gemm<T>(p, a.allow_tf32, stream, "linear_forward");
    }
  });
}

int64_t linear_backward_workspace_size(int64_t B, int64_t N, int64_t M, int64_t K, bool need_dw,
                                       bool need_db) {
  require(B >= 0 && N >= 0 && M >= 0 && K >= 0, "sizes must be >= 0");
  need_dw = need_dw && B * M * K > 0;
  need_db = need_db && B * M > 0;
  return workspace_layout(B, N, M, K, need_dw, need_db).total;
}

void linear_backward(const LinearBackwardArgs& a) {
  check_common(a.dtype, a.act, a.B, a.N, a.M, a.K);
  const bool need_dx = a.dx != 0 && a.B * a.N * a.K > 0;
  const bool need_dw = a.dw != 0 && a.B * a.M * a.K > 0;
  const bool need_db = a.db != 0 && a.B * a.M > 0;
  if (!need_dx && !need_dw && !need_db) return;
  const bool has_dz_elems = a.B * a.N * a.M > 0;
  const std::string act = act_name(a.act);
  if (has_dz_elems) {
    require(a.dy != 0, "linear_backward: dy must not be null");
    if (a.act != kActNone) {
      require(a.saved != 0, "linear_backward: act '" + act +
                                "' needs `saved` (the preact z, or the output y)");
      require(a.saved_is_preact || act_grad_from_output_ok(a.act),
              "linear_backward: the derivative of act '" + act +
                  "' cannot be computed from the output y; pass the preact z "
                  "(saved_is_preact=True)");
    }
  }
  const bool write_dz = a.act != kActNone && (need_dx || need_dw) && has_dz_elems;
  require(!write_dz || a.dz != 0,
          "linear_backward: act '" + act + "' with dx or dw wanted needs the dz scratch buffer");
  require(!need_dx || a.M == 0 || a.w != 0, "linear_backward: dx wanted but w is null");
  require(!need_dw || a.N == 0 || a.x != 0, "linear_backward: dw wanted but x is null");
  const WorkspaceLayout lay = workspace_layout(a.B, a.N, a.M, a.K, need_dw, need_db);
  require(lay.total == 0 || (a.workspace != 0 && a.workspace_bytes >= lay.total),
          "linear_backward: needs a workspace of " + std::to_string(lay.total) +
              " bytes (see linear_backward_workspace_size), got " +
              std::to_string(a.workspace_bytes) + " bytes at address " +
              std::to_string(a.workspace));
  require(lay.total == 0 || a.workspace % 16 == 0,
          "linear_backward: the workspace must be 16-byte aligned");
  check_no_pending_error("linear_backward");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  char* ws_base = reinterpret_cast<char*>(a.workspace);
  float* ws_dw = lay.dw_bytes > 0 ? reinterpret_cast<float*>(ws_base + lay.dw_offset) : nullptr;
  float* ws_db = lay.db_bytes > 0 ? reinterpret_cast<float*>(ws_base + lay.db_offset) : nullptr;

  // The operand the GEMMs read as dz: dy itself when the activation is the identity.
  const std::uintptr_t dzp = a.act == kActNone ? a.dy : a.dz;
  const i64 sdzb = a.act == kActNone ? a.sdyb : a.sdzb;
  const i64 sdzn = a.act == kActNone ? a.sdyn : a.sdzn;
  const i64 sdzm = a.act == kActNone ? a.sdym : a.sdzm;

  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kElem = static_cast<int>(sizeof(T));

    // 1. dz = dy * act'(saved) (stored if the GEMMs need it) and db = column sums of dz.
    if (write_dz || need_db) {
      const SplitPlan plan = plan_dz(a.B, a.N, a.M);
      DzParams p{};
      p.dy = cptr(a.dy), p.sdyb = a.sdyb, p.sdyn = a.sdyn, p.sdym = a.sdym;
      p.sv = cptr(a.saved), p.ssb = a.ssb, p.ssn = a.ssn, p.ssm = a.ssm;
      p.sv_is_preact = a.saved_is_preact ? 1 : 0;
      p.dz = write_dz ? mptr(a.dz) : nullptr;
      p.sdzb = a.sdzb, p.sdzn = a.sdzn, p.sdzm = a.sdzm;
      p.db = need_db ? mptr(a.db) : nullptr;
      p.sdbb = a.sdbb, p.sdbm = a.sdbm;
      p.ws = (need_db && plan.splits > 1) ? ws_db : nullptr;
      p.B = a.B, p.N = a.N, p.M = a.M;
      p.n_chunk = plan.chunk, p.splits = plan.splits;
      p.act = a.act, p.w0 = a.w0;
      const bool n_fast = a.sdyn == 1 && a.sdym != 1 && a.N > 1;
      if (n_fast) {
        const i64 blocks = a.B * ceil_div(a.M, kDzThreads / 32) * plan.splits;
        dz_db_nfast_kernel<T><<<grid_size(blocks), kDzThreads, 0, stream>>>(p);
        after_launch<T>("linear_backward", "dz_db_nfast_kernel");
      } else {
        const i64 blocks = a.B * ceil_div(a.M, 32) * plan.splits;
        dz_db_mfast_kernel<T><<<grid_size(blocks), kDzThreads, 0, stream>>>(p);
        after_launch<T>("linear_backward", "dz_db_mfast_kernel");
      }
      if (need_db && plan.splits > 1) {
        launch_reduce_splits<T>(ws_db, plan.splits, a.B, 1, a.M, mptr(a.db), a.sdbb, 0, a.sdbm,
                                stream, "linear_backward");
      }
    }

    // 2. dx[b, n, k] = sum_m dz[b, n, m] w[b, m, k]: the forward with w^T, no bias, no act.
    if (need_dx) {
      if (a.N == 1) {
        GemvParams p{};
        p.x = cptr(dzp), p.sxb = sdzb, p.sxd = sdzm;
        p.w = cptr(a.w), p.swb = a.swb, p.swc = a.swk, p.swd = a.swm;
        p.bias = nullptr, p.sbb = 0, p.sbc = 0;
        p.out = mptr(a.dx), p.sob = a.sdxb, p.soc = a.sdxk;
        p.pre = nullptr;
        p.B = a.B, p.C = a.K, p.D = a.M;
        p.act = kActNone, p.w0 = 1.0f;
        launch_gemv<T>(p, stream, "linear_backward (dx)");
      } else {
        GemmParams p{};
        p.a = cptr(dzp), p.sab = sdzb, p.sar = sdzn, p.sad = sdzm;
        p.w = cptr(a.w), p.swb = a.swb, p.swc = a.swk, p.swd = a.swm;
        p.bias = nullptr, p.sbb = 0, p.sbc = 0;
        p.out = mptr(a.dx), p.sob = a.sdxb, p.sor = a.sdxn, p.soc = a.sdxk;
        p.pre = nullptr;
        p.ws = nullptr;
        p.B = a.B, p.R = a.N, p.C = a.K, p.D = a.M;
        p.d_chunk = a.M, p.splits = 1;
        p.act = kActNone, p.w0 = 1.0f;
        p.a_mode = load_mode(dzp, sdzb, a.B, sdzn, a.N, sdzm, kElem);
        p.w_mode = load_mode(a.w, a.swb, a.B, a.swk, a.K, a.swm, kElem);
        p.out_r_fast = (a.sdxn == 1 && a.sdxk != 1) ? 1 : 0;
        launch_gemm<T>(p, a.allow_tf32, stream, "linear_backward (dx)");
      }
    }

    // 3. dw[b, m, k] = sum_n dz[b, n, m] x[b, n, k].
    if (need_dw) {
      if (a.N == 1) {
        const bool k_fast = a.sdwk == 1 || a.sdwm != 1;
        const i64 total = a.B * a.M * a.K;
        const T* dz_t = static_cast<const T*>(cptr(dzp));
        const T* x_t = static_cast<const T*>(cptr(a.x));
        T* dw_t = static_cast<T*>(mptr(a.dw));
        dispatch_bool(k_fast, [&](auto kc) {
          outer_kernel<T, decltype(kc)::value><<<grid_size(ceil_div(total, 256)), 256, 0, stream>>>(
              dz_t, sdzb, sdzm, x_t, a.sxb, a.sxk, dw_t, a.sdwb, a.sdwm, a.sdwk, a.B, a.M, a.K);
          after_launch<T>("linear_backward (dw)", "outer_kernel");
        });
      } else {
        const SplitPlan plan = plan_dw(a.B, a.N, a.M, a.K);
        GemmParams p{};
        p.a = cptr(dzp), p.sab = sdzb, p.sar = sdzm, p.sad = sdzn;
        p.w = cptr(a.x), p.swb = a.sxb, p.swc = a.sxk, p.swd = a.sxn;
        p.bias = nullptr, p.sbb = 0, p.sbc = 0;
        p.out = mptr(a.dw), p.sob = a.sdwb, p.sor = a.sdwm, p.soc = a.sdwk;
        p.pre = nullptr;
        p.ws = plan.splits > 1 ? ws_dw : nullptr;
        p.B = a.B, p.R = a.M, p.C = a.K, p.D = a.N;
        p.d_chunk = plan.chunk, p.splits = plan.splits;
        p.act = kActNone, p.w0 = 1.0f;
        p.a_mode = load_mode(dzp, sdzb, a.B, sdzm, a.M, sdzn, kElem);
        p.w_mode = load_mode(a.x, a.sxb, a.B, a.sxk, a.K, a.sxn, kElem);
        // Split partials go to the workspace, contiguous along c: store along c then.
        p.out_r_fast = (plan.splits == 1 && a.sdwm == 1 && a.sdwk != 1) ? 1 : 0;
        launch_gemm<T>(p, a.allow_tf32, stream, "linear_backward (dw)");
        if (plan.splits > 1) {
          launch_reduce_splits<T>(ws_dw, plan.splits, a.B, a.M, a.K, mptr(a.dw), a.sdwb, a.sdwm,
                                  a.sdwk, stream, "linear_backward (dw)");
        }
      }
    }
  });
}

}  // namespace hk
