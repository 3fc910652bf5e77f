// Host-side interface of the batched (per-sample) linear layer kernels.
//
//   forward : z[b,n,m] = sum_k x[b,n,k] w[b,m,k] + bias[b,m];  y = act(z)
//   backward: dz = dy * act'(z);  dx = dz @ w;  dw[b] = dz[b]^T x[b];  db[b] = sum_n dz[b]
//
// Pointers are raw device addresses (tensor.data_ptr(), 0 = absent), strides are in
// elements, the stream is a cudaStream_t as an integer. No launcher allocates, synchronises
// or changes the current device, so every launch can be captured in a CUDA graph.
//
// Contract with the caller (hyperkernels/backends/cuda): the launchers check codes, sizes,
// null pointers and the workspace size (ValueError), nothing else. The caller guarantees:
//   * every tensor is on the current device, in the one dtype `dtype`, with the given sizes;
//     strides are >= 0 and address only memory inside the tensor (any stride may be 0);
//   * outputs (y, preact, dz, dx, dw, db, workspace) do not overlap each other or any input:
//     inputs are read through the read-only cache;
//   * for act in {gelu, silu, sine} the backward gets the preact z (saved_is_preact = true);
//     none / relu / tanh / sigmoid may instead pass the output y;
//   * dz is a scratch of shape (B, N, M) in `dtype`, best laid out like dy (same strides);
//   * workspace: linear_backward_workspace_size(...) bytes, 16-byte aligned (any torch
//     allocation is), contents irrelevant.
// Nothing needs alignment for correctness. Fast paths engage by themselves: 16-byte vector
// loads where an operand's reduction dim has stride 1 and its pointer and other strides are
// 16-byte multiples (a ParamLayout that pads each weight's offset and row length to 16 bytes
// gets them); coalesced scalar loads where the row dim has stride 1 instead.
//
// The argument structs are declared from field lists, X(type, name, default), because the
// Python class of each (bindings.cpp: one attribute and one required keyword per field) is
// generated from the same list: a field is named once, and Python cannot leave one unset.
#pragma once

#include <cstdint>

// Fields both directions share.
#define HK_LINEAR_COMMON_FIELDS(X)                                                             \
  X(int, dtype, 0)           /* DType code: 0 float32, 1 float16, 2 bfloat16 (every tensor) */ \
  X(int, act, 0)             /* Act code (activations.cuh) */                                  \
  X(float, w0, 1.0f)         /* frequency of the sine activation (ignored by the others) */    \
  X(bool, allow_tf32, false) /* float32 only: TF32 tensor cores for the N > 1 (GEMM) path */   \
  X(int64_t, B, 0)                                                                             \
  X(int64_t, N, 0)                                                                             \
  X(int64_t, M, 0)                                                                             \
  X(int64_t, K, 0)                                                                             \
  X(std::uintptr_t, x, 0) /* (B, N, K); the backward reads it only for dw */                   \
  X(int64_t, sxb, 0)                                                                           \
  X(int64_t, sxn, 0)                                                                           \
  X(int64_t, sxk, 0)                                                                           \
  X(std::uintptr_t, w, 0) /* (B, M, K); the backward reads it only for dx */                   \
  X(int64_t, swb, 0)                                                                           \
  X(int64_t, swm, 0)                                                                           \
  X(int64_t, swk, 0)                                                                           \
  X(std::uintptr_t, stream, 0) /* cudaStream_t */

#define HK_LINEAR_FORWARD_FIELDS(X)                                    \
  HK_LINEAR_COMMON_FIELDS(X)                                           \
  X(std::uintptr_t, bias, 0) /* (B, M) or 0 */                         \
  X(int64_t, sbb, 0)                                                   \
  X(int64_t, sbm, 0)                                                   \
  X(std::uintptr_t, y, 0) /* (B, N, M) output */                       \
  X(int64_t, syb, 0)                                                   \
  X(int64_t, syn, 0)                                                   \
  X(int64_t, sym, 0)                                                   \
  X(std::uintptr_t, preact, 0) /* (B, N, M) output z or 0; y's strides */

#define HK_LINEAR_BACKWARD_FIELDS(X)                                                          \
  HK_LINEAR_COMMON_FIELDS(X)                                                                  \
  X(std::uintptr_t, dy, 0) /* (B, N, M) upstream gradient */                                  \
  X(int64_t, sdyb, 0)                                                                         \
  X(int64_t, sdyn, 0)                                                                         \
  X(int64_t, sdym, 0)                                                                         \
  X(std::uintptr_t, saved, 0) /* (B, N, M): the preact z, or the output y */                  \
  X(int64_t, ssb, 0)                                                                          \
  X(int64_t, ssn, 0)                                                                          \
  X(int64_t, ssm, 0)                                                                          \
  X(bool, saved_is_preact, false)                                                             \
  X(std::uintptr_t, dz, 0) /* (B, N, M) scratch, written when act != none and dx or dw */     \
  X(int64_t, sdzb, 0)                                                                         \
  X(int64_t, sdzn, 0)                                                                         \
  X(int64_t, sdzm, 0)                                                                         \
  X(std::uintptr_t, dx, 0) /* (B, N, K) output or 0 */                                        \
  X(int64_t, sdxb, 0)                                                                         \
  X(int64_t, sdxn, 0)                                                                         \
  X(int64_t, sdxk, 0)                                                                         \
  X(std::uintptr_t, dw, 0) /* (B, M, K) output or 0 */                                        \
  X(int64_t, sdwb, 0)                                                                         \
  X(int64_t, sdwm, 0)                                                                         \
  X(int64_t, sdwk, 0)                                                                         \
  X(std::uintptr_t, db, 0) /* (B, M) output or 0 */                                           \
  X(int64_t, sdbb, 0)                                                                         \
  X(int64_t, sdbm, 0)                                                                         \
  X(std::uintptr_t, workspace, 0) /* float32 scratch for split reductions, or 0 if none */    \
  X(int64_t, workspace_bytes, 0)

namespace hk {

#define HK_DECLARE_FIELD(type, name, init) type name = init;

struct LinearForwardArgs {
  HK_LINEAR_FORWARD_FIELDS(HK_DECLARE_FIELD)
};

struct LinearBackwardArgs {
  HK_LINEAR_BACKWARD_FIELDS(HK_DECLARE_FIELD)
};

#undef HK_DECLARE_FIELD

void linear_forward(const LinearForwardArgs& args);
void linear_backward(const LinearBackwardArgs& args);

// Bytes of device workspace linear_backward needs for these sizes (0: none; pass 0).
// Depends only on its arguments (not on the GPU), so results are reproducible everywhere.
int64_t linear_backward_workspace_size(int64_t B, int64_t N, int64_t M, int64_t K, bool need_dw,
                                       bool need_db);

}  // namespace hk
