// The activation table of the CUDA backend: codes, forward and derivative side by side.
// It mirrors hyperkernels/activations.py (the project's one table); the codes are the ints
// Python passes, and the module exports the names in code order (ACTIVATIONS) so that Python can
// check the two tables agree.
//
//   code name     forward y = f(z)                 derivative f'(z)                 from y?
//   0    none     z                                1                                yes
//   1    relu     max(z, 0)                        z > 0                            yes: y > 0
//   2    gelu     z Phi(z) = z/2 (1 + erf(z/√2))   Phi(z) + z phi(z)                no
//   3    silu     z s(z),  s = sigmoid             s (1 + z (1 - s))                no
//   4    tanh     tanh(z)                          1 - y²                           yes
//   5    sigmoid  s(z) = 1 / (1 + e^-z)            y (1 - y)                        yes
//   6    sine     sin(w0 z)                        w0 cos(w0 z)                     no
//
// Everything is evaluated in float32 with the accurate libm functions (erff, expf, tanhf,
// sinpif / cospif: the build never uses --use_fast_math), whatever the storage dtype.
// This header is also included by host-only code (bindings.cpp, batched_linear.cpp) for the
// codes, names and act_grad_from_output_ok.
#pragma once

namespace hk {

enum Act : int {
  kActNone = 0,
  kActRelu = 1,
  kActGelu = 2,
  kActSilu = 3,
  kActTanh = 4,
  kActSigmoid = 5,
  kActSine = 6,
};
constexpr int kNumActs = 7;

inline const char* act_name(int act) {
  switch (act) {
    case kActNone: return "none";
    case kActRelu: return "relu";
    case kActGelu: return "gelu";
    case kActSilu: return "silu";
    case kActTanh: return "tanh";
    case kActSigmoid: return "sigmoid";
    case kActSine: return "sine";
    default: return "unknown";
  }
}

// True where f'(z) can be computed from y = f(z) alone (so the forward need not save z).
constexpr bool act_grad_from_output_ok(int act) {
  return act == kActNone || act == kActRelu || act == kActTanh || act == kActSigmoid;
}

#ifdef __CUDACC__

constexpr float kInvSqrt2 = 0.70710678118654752440f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

// The sine argument w0 z in units of pi, reduced to [-1, 1] in double precision: w0 * z is
// exact in double and the reduction is exact, so the reduced argument is good to float32
// rounding for |w0 z| up to about 1e9 (more exact than sinf(w0 * z), which first rounds
// w0 * z to float). sinpif / cospif then need no Payne-Hanek slow path, so no kernel gets a
// local-memory stack frame (or the register spills around it) from the sine.
__device__ __forceinline__ float sine_arg_pi_units(float w0, float z) {
  constexpr double kInvPi = 0.318309886183790671538;
  double t = static_cast<double>(w0) * static_cast<double>(z) * kInvPi;
  t -= 2.0 * rint(0.5 * t);  // exact; inf / NaN stay NaN (sin(inf) is NaN)
  return static_cast<float>(t);
}

// y = f(z). `act` is uniform across the launch, so the switch does not diverge.
__device__ __forceinline__ float act_forward(int act, float z, float w0) {
  switch (act) {
    case kActRelu: return z < 0.0f ? 0.0f : z;  // NaN propagates, like torch.relu
    case kActGelu: return 0.5f * z * (1.0f + erff(z * kInvSqrt2));
    case kActSilu: return z * sigmoid_f(z);
    case kActTanh: return tanhf(z);
    case kActSigmoid: return sigmoid_f(z);
    case kActSine: return sinpif(sine_arg_pi_units(w0, z));
    default: return z;  // kActNone
  }
}

// f'(z) from the pre-activation z (every activation).
__device__ __forceinline__ float act_grad_from_preact(int act, float z, float w0) {
  switch (act) {
    case kActRelu: return z <= 0.0f ? 0.0f : 1.0f;  // like torch's threshold_backward
    case kActGelu: {
      const float cdf = 0.5f * (1.0f + erff(z * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * z * z);
      return cdf + z * pdf;
    }
    case kActSilu: {
      const float s = sigmoid_f(z);
      return s * (1.0f + z * (1.0f - s));
    }
    case kActTanh: {
      const float t = tanhf(z);
      return 1.0f - t * t;
    }
    case kActSigmoid: {
      const float s = sigmoid_f(z);
      return s * (1.0f - s);
    }
    case kActSine: return w0 * cospif(sine_arg_pi_units(w0, z));
    default: return 1.0f;  // kActNone
  }
}

// f'(z) from the output y = f(z); only for codes where act_grad_from_output_ok(act).
__device__ __forceinline__ float act_grad_from_output(int act, float y) {
  switch (act) {
    case kActRelu: return y <= 0.0f ? 0.0f : 1.0f;
    case kActTanh: return 1.0f - y * y;
    case kActSigmoid: return y * (1.0f - y);
    default: return 1.0f;  // kActNone (others are rejected on the host)
  }
}

#endif  // __CUDACC__

}  // namespace hk
