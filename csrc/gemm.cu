// The tiled batched GEMM of every N > 1 product:
//   out[b, r, c] = act(sum_{d in split} A[b, r, d] W[b, c, d] + bias[b, c])
// (the forward with A = x, W = w; dx with A = dz, W = w^T; dw with A = dz^T, W = x^T).
//
// One kernel, templated on dtype and math core (gemm_cores.cuh), because the rest is the same for
// all of them: a 64 x 64 x 32 tile per CTA (4 warps), double-buffered shared memory fed through
// registers (global loads of the next stage overlap the math of the current one), and an
// epilogue staged through shared memory so the global stores are coalesced along whichever
// output dim is contiguous. How each operand is read (LoadMode) and which dim the stores run
// along are runtime parameters chosen here from the strides, not template arguments, so they
// cost no extra instantiations. A split reduction (dw with a long N) writes raw float partials
// to the workspace instead of the epilogue; reductions.cu sums them.
#include <cuda_runtime.h>

#include <type_traits>

#include "activations.cuh"
#include "dispatch.h"
#include "gemm_cores.cuh"
#include "kernels.h"
#include "launch.cuh"
#include "memory.cuh"

namespace hk {
namespace {

// How a thread block reads an operand tile (rows x kTileD) from global memory; chosen on the
// host from the strides. Every mode packs 16 bytes = one chunk of consecutive d of one row
// into a register and stores it into shared memory as [row][d] with one 16-byte store.
enum LoadMode : int {
  kLoadDFast = 0,  // scalar loads, consecutive threads along d (d contiguous but unaligned, or
                   // neither dim contiguous)
  kLoadVec = 1,    // 16-byte vector loads along d (sd == 1, aligned)
  kLoadRFast = 2,  // scalar loads, consecutive threads along rows (sr == 1): coalesced
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
// How the GEMM reads an operand [b, r, d] (see LoadMode).
int load_mode(const void* ptr, i64 sb, i64 nb, i64 sr, i64 nr, i64 sd, int elem) {
  if (sd == 1) {
    const bool aligned = aligned16(reinterpret_cast<std::uintptr_t>(ptr)) &&
                         stride_ok16(sb, nb, elem) && stride_ok16(sr, nr, elem);
    return aligned ? kLoadVec : kLoadDFast;
  }
  return sr == 1 ? kLoadRFast : kLoadDFast;
}

template <typename T>
void launch_gemm_typed(GemmParams p, bool allow_tf32, cudaStream_t stream, const char* op) {
  if (p.B == 0 || p.R == 0 || p.C == 0) return;
  constexpr int kElem = static_cast<int>(sizeof(T));
  p.a_mode = load_mode(p.a, p.sab, p.B, p.sar, p.R, p.sad, kElem);
  p.w_mode = load_mode(p.w, p.swb, p.B, p.swc, p.C, p.swd, kElem);
  // Split partials go to the workspace, contiguous along c: store along c then.
  p.out_r_fast = (p.splits == 1 && p.sor == 1 && p.soc != 1) ? 1 : 0;
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

}  // namespace

void launch_gemm(int dtype, bool allow_tf32, GemmParams p, cudaStream_t stream, const char* op) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch_gemm_typed<typename decltype(tag)::type>(p, allow_tf32, stream, op);
  });
}

}  // namespace hk
