// Batched (per-sample) linear layer: the entry points of batched_linear.h and the planning
// behind them.
//
//   forward : z[b,n,m] = sum_k x[b,n,k] w[b,m,k] + bias[b,m];   y = act(z)
//   backward: dz = dy * act'(z);   dx[b,n,k] = sum_m dz[b,n,m] w[b,m,k]
//             dw[b,m,k] = sum_n dz[b,n,m] x[b,n,k];   db[b,m] = sum_n dz[b,n,m]
//
// This file decides what runs, the kernel files (kernels.h) how: it checks the arguments, maps
// each product onto a kernel family by passing strides, and plans split reductions:
//     forward  : A = x (r = n, d = k),        W = w   (c = m, d = k)
//     dx       : A = dz (r = n, d = m),       W = w^T (c = k, d = m): strides (swb, swk, swm)
//     dw       : A = dz^T (r = m, d = n),     W = x^T (c = k, d = n)
// Paths: N == 1 forward and dx on the GEMV kernels, N == 1 dw as an outer product; N > 1 on the
// tiled GEMM; dz (and db, its column sum) in one elementwise pass. A long reduction (dw over N,
// db over N) is split across CTAs into a float32 workspace and summed in a fixed order. The plan
// depends only on the sizes, never on the GPU, so the summation order, and so the result, is the
// same on every device; the workspace size Python allocates comes from the same plan.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "activations.cuh"
#include "batched_linear.h"
#include "checks.h"
#include "dispatch.h"
#include "kernels.h"

namespace hk {
namespace {

// Split a long reduction until about this many CTAs exist: a few waves on any current GPU
// (108 SMs on A100, 132 on H100). A constant (not the SM count) keeps the split, and so the
// float32 summation order, the same on every device.
constexpr i64 kTargetCtas = 512;
constexpr i64 kMaxSplits = 64;
constexpr i64 kMinGemmSplitLen = 4 * kTileD;  // dw GEMM: at least 4 pipeline stages per split
constexpr i64 kMinDzSplitLen = 64;            // dz / db: at least 64 rows per split

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
  return plan_split(B * ceil_div(M, kDzTileM), N, kMinDzSplitLen, 1);
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

void linear_forward(const LinearForwardArgs& a) {
  check_common(a.dtype, a.act, a.B, a.N, a.M, a.K);
  if (a.B == 0 || a.N == 0 || a.M == 0) return;  // empty output
  require(a.y != 0, "linear_forward: y must not be null");
  require(a.K == 0 || (a.x != 0 && a.w != 0), "linear_forward: x and w must not be null");
  check_no_pending_error("linear_forward");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (a.N == 1) {
    GemvParams p{};
    p.x = cptr(a.x), p.sxb = a.sxb, p.sxd = a.sxk;
    p.w = cptr(a.w), p.swb = a.swb, p.swc = a.swm, p.swd = a.swk;
    p.bias = cptr(a.bias), p.sbb = a.sbb, p.sbc = a.sbm;
    p.out = mptr(a.y), p.sob = a.syb, p.soc = a.sym;
    p.pre = mptr(a.preact);
    p.B = a.B, p.C = a.M, p.D = a.K;
    p.act = a.act, p.w0 = a.w0;
    launch_gemv(a.dtype, p, stream, "linear_forward");
  } else {
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
    launch_gemm(a.dtype, a.allow_tf32, p, stream, "linear_forward");
  }
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
    launch_dz_db(a.dtype, p, stream, "linear_backward");
    if (need_db && plan.splits > 1) {
      launch_reduce_splits(a.dtype, ws_db, plan.splits, a.B, 1, a.M, mptr(a.db), a.sdbb, 0, a.sdbm,
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
      launch_gemv(a.dtype, p, stream, "linear_backward (dx)");
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
      launch_gemm(a.dtype, a.allow_tf32, p, stream, "linear_backward (dx)");
    }
  }

  // 3. dw[b, m, k] = sum_n dz[b, n, m] x[b, n, k].
  if (need_dw) {
    if (a.N == 1) {
      OuterParams p{};
      p.dz = cptr(dzp), p.sdzb = sdzb, p.sdzm = sdzm;
      p.x = cptr(a.x), p.sxb = a.sxb, p.sxk = a.sxk;
      p.dw = mptr(a.dw), p.sdwb = a.sdwb, p.sdwm = a.sdwm, p.sdwk = a.sdwk;
      p.B = a.B, p.M = a.M, p.K = a.K;
      launch_outer(a.dtype, p, stream, "linear_backward (dw)");
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
      launch_gemm(a.dtype, a.allow_tf32, p, stream, "linear_backward (dw)");
      if (plan.splits > 1) {
        launch_reduce_splits(a.dtype, ws_dw, plan.splits, a.B, a.M, a.K, mptr(a.dw), a.sdwb,
                             a.sdwm, a.sdwk, stream, "linear_backward (dw)");
      }
    }
  }
}

}  // namespace hk
