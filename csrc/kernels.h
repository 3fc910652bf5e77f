// The kernel families as the entry points (batched_linear.cpp) see them: one parameter struct and
// one launcher each, dtype given as the DType code.
//
// Every family is written once over a generic problem and each use maps its operands onto it by
// passing strides (batched_linear.cpp says which). Each launcher picks its own variant from the
// pointers and strides it is given (vector or scalar loads, which dim the lanes run along,
// tensor-core or FMA math), so the entry points only decide roles and splits; the launchers
// check the launch and raise, naming `op`, the kernel and the dtype, if it fails.
//
// Conventions of every kernel: tensors are addressed through strides in elements, none assumed
// contiguous, any may be 0 (a weight shared by every sample is an expand with batch stride 0);
// all index arithmetic is 64-bit; grids are 1-D (blockIdx.x up to 2^31 - 1) and each kernel
// walks its work items with a block-stride loop, so no size can overflow a grid dimension;
// accumulation is float32, outputs are rounded to nearest in the storage dtype.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hk {

using i64 = int64_t;

inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// ---- GEMV (gemv.cu): out[b, c] = act(sum_d x[b, d] * w[b, c, d] + bias[b, c]) -----------------

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

void launch_gemv(int dtype, const GemvParams& p, cudaStream_t stream, const char* op);

// ---- tiled GEMM (gemm.cu) ---------------------------------------------------------------------
// out[b, r, c] = act(sum_{d in split} A[b, r, d] W[b, c, d] + bias[b, c])

// Output tile of one CTA (kTile rows x kTile cols) and the reduction depth of one pipeline
// stage; the split planner aligns split lengths to kTileD.
constexpr int kTile = 64;
constexpr int kTileD = 32;

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
  // Set by launch_gemm from the pointers and strides above (the caller leaves them 0).
  int a_mode, w_mode;  // LoadMode of A and W (gemm.cu)
  int out_r_fast;      // 1: output stores run along r (sor == 1), else along c
};

void launch_gemm(int dtype, bool allow_tf32, GemmParams p, cudaStream_t stream, const char* op);

// ---- reductions (reductions.cu) ----------------------------------------------------------------

// dz = dy * act'(saved), optionally stored, and the fused column sums
// db[b, m] = sum_{n in split} dz[b, n, m] (written directly, or as float partials per split).
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

// The m-tile of the dz / db kernel that reads along m: the split planner counts its tiles.
constexpr int kDzTileM = 32;

void launch_dz_db(int dtype, const DzParams& p, cudaStream_t stream, const char* op);

// dw for N == 1, no reduction: dw[b, m, k] = dz[b, m] * x[b, k].
struct OuterParams {
  const void* dz;
  i64 sdzb, sdzm;
  const void* x;
  i64 sxb, sxk;
  void* dw;
  i64 sdwb, sdwm, sdwk;
  i64 B, M, K;
};

void launch_outer(int dtype, const OuterParams& p, cudaStream_t stream, const char* op);

// out[b, r, c] = sum_s ws[((s * B + b) * R + r) * C + c], summed in split order (deterministic).
void launch_reduce_splits(int dtype, const float* ws, i64 splits, i64 B, i64 R, i64 C, void* out,
                          i64 sob, i64 sor, i64 soc, cudaStream_t stream, const char* op);

}  // namespace hk
