// The backward's reductions and elementwise passes:
//   * dz = dy * act'(saved), stored for the GEMMs, fused with db[b, m] = sum_n dz[b, n, m]
//     (dz_db_mfast_kernel when m is contiguous or nothing is, dz_db_nfast_kernel when n is,
//     e.g. the channel-major conv layout);
//   * dw for N == 1, the outer product dz[b]^T x[b], written once (outer_kernel);
//   * the fixed-order sum of split partials from the float32 workspace (reduce_splits_kernel),
//     for the dw GEMM and for db.
// They share a file because they are the memory-bound passes around the GEMMs, each a plain walk
// over (b, n, m) or (b, r, c) with one float accumulator; a long reduction is split over CTAs and
// its partials summed in split order, so results do not depend on the GPU or on timing.
#include <cuda_runtime.h>

#include "activations.cuh"
#include "dispatch.h"
#include "kernels.h"
#include "launch.cuh"
#include "memory.cuh"

namespace hk {
namespace {

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

template <typename T>
void launch_dz_db_typed(const DzParams& p, cudaStream_t stream, const char* op) {
  const bool n_fast = p.sdyn == 1 && p.sdym != 1 && p.N > 1;
  if (n_fast) {
    const i64 blocks = p.B * ceil_div(p.M, kDzThreads / 32) * p.splits;
    dz_db_nfast_kernel<T><<<grid_size(blocks), kDzThreads, 0, stream>>>(p);
    after_launch<T>(op, "dz_db_nfast_kernel");
  } else {
    const i64 blocks = p.B * ceil_div(p.M, kDzTileM) * p.splits;
    dz_db_mfast_kernel<T><<<grid_size(blocks), kDzThreads, 0, stream>>>(p);
    after_launch<T>(op, "dz_db_mfast_kernel");
  }
}

template <typename T>
void launch_outer_typed(const OuterParams& p, cudaStream_t stream, const char* op) {
  const bool k_fast = p.sdwk == 1 || p.sdwm != 1;
  const i64 total = p.B * p.M * p.K;
  const T* dz = static_cast<const T*>(p.dz);
  const T* x = static_cast<const T*>(p.x);
  T* dw = static_cast<T*>(p.dw);
  dispatch_bool(k_fast, [&](auto kc) {
    outer_kernel<T, decltype(kc)::value><<<grid_size(ceil_div(total, 256)), 256, 0, stream>>>(
        dz, p.sdzb, p.sdzm, x, p.sxb, p.sxk, dw, p.sdwb, p.sdwm, p.sdwk, p.B, p.M, p.K);
    after_launch<T>(op, "outer_kernel");
  });
}

template <typename T>
void launch_reduce_splits_typed(const float* ws, i64 splits, i64 B, i64 R, i64 C, void* out,
                                i64 sob, i64 sor, i64 soc, cudaStream_t stream, const char* op) {
  const i64 total = B * R * C;
  if (total == 0) return;
  reduce_splits_kernel<T><<<grid_size(ceil_div(total, 256)), 256, 0, stream>>>(
      ws, splits, B, R, C, static_cast<T*>(out), sob, sor, soc);
  after_launch<T>(op, "reduce_splits_kernel");
}

}  // namespace

void launch_dz_db(int dtype, const DzParams& p, cudaStream_t stream, const char* op) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch_dz_db_typed<typename decltype(tag)::type>(p, stream, op);
  });
}

void launch_outer(int dtype, const OuterParams& p, cudaStream_t stream, const char* op) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch_outer_typed<typename decltype(tag)::type>(p, stream, op);
  });
}

void launch_reduce_splits(int dtype, const float* ws, i64 splits, i64 B, i64 R, i64 C, void* out,
                          i64 sob, i64 sor, i64 soc, cudaStream_t stream, const char* op) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_reduce_splits_typed<T>(ws, splits, B, R, C, out, sob, sor, soc, stream, op);
  });
}

}  // namespace hk
