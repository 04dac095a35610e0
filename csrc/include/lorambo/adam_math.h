// The slot-aware AdamW update of one element and its per-slot coefficients, shared by the CPU
// and CUDA pool_adamw_ kernels (__host__ __device__), in the compute dtype of the pool and in the
// order of the torch._foreach path in lorambo/optim/adamw.py, so the three agree up to rounding:
//   g = maximize ? -grad : grad;  p *= 1 - lr * weight_decay
//   m = lerp(m, g, 1 - beta1);     v = v * beta2 + (1 - beta2) * g * g;  vmax = max(vmax, v) (amsgrad)
//   p -= m / ((sqrt(amsgrad ? vmax : v) * rsqrt(bc2) + eps) * (bc1 / lr)),  bc = 1 - beta^t (per slot)
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LORAMBO_ADAM_HD __host__ __device__ __forceinline__
#else
#define LORAMBO_ADAM_HD inline
#endif

namespace lorambo {

template <typename T>
struct AdamScalars {
  T decay, w1, beta2, w2, eps;  // decay = 1 - lr * weight_decay, w1 = 1 - beta1, w2 = 1 - beta2
  bool maximize;
  T lr, log_beta1, log_beta2;  // for the per-slot coefficients (adam_slot_coefficients)
  bool beta1_zero, beta2_zero;
};

// The step's scalars in T, each rounded from double as torch rounds a Python float scalar to the
// tensor's dtype.
template <typename T>
LORAMBO_ADAM_HD AdamScalars<T> make_adam_scalars(double lr, double beta1, double beta2, double eps,
                                                 double weight_decay, bool maximize) {
  using std::log;
  return {static_cast<T>(1.0 - lr * weight_decay), static_cast<T>(1.0 - beta1), static_cast<T>(beta2),
          static_cast<T>(1.0 - beta2), static_cast<T>(eps), maximize, static_cast<T>(lr),
          static_cast<T>(log(beta1)), static_cast<T>(log(beta2)), beta1 == 0.0, beta2 == 0.0};
}

// torch.lerp takes `self + w (end - self)` for |w| < 0.5 and `end - (end - self)(1 - w)`
// otherwise, so the first moment rounds as torch's does; w = 1 - beta1 is fixed per step.
template <typename T>
LORAMBO_ADAM_HD bool adam_lerp_from_self(T weight) {
  return weight < T(0.5) && weight > T(-0.5);
}

// 1 - beta^t as -expm1(t * log(beta)) in T (accurate for beta close to 1); 1 for beta = 0.
template <typename T>
LORAMBO_ADAM_HD T adam_bias_correction(T t, T log_beta, bool beta_is_zero) {
  using std::expm1;  // the float overload for float (C's ::expm1 would compute in double)
  return beta_is_zero ? T(1) : -expm1(t * log_beta);
}

// A slot at step t (its count after this step's increment): a = rsqrt(bc2), c = bc1 / lr (inf at
// lr = 0: the update is then exactly 0).
template <typename T>
LORAMBO_ADAM_HD void adam_slot_coefficients(T t, const AdamScalars<T>& s, T& a, T& c) {
  using std::sqrt;
  a = T(1) / sqrt(adam_bias_correction(t, s.log_beta2, s.beta2_zero));
  c = adam_bias_correction(t, s.log_beta1, s.beta1_zero) / s.lr;
}

// a and c from adam_slot_coefficients. The two per-step choices are template flags, so a CPU loop over elements has no control flow and vectorises
// (GCC does not unswitch the larger bf16 loop body by itself).
template <typename T, bool Maximize, bool LerpFromSelf>
LORAMBO_ADAM_HD void adam_element_fixed(T& p, T g, T& m, T& v, T* vmax, T a, T c, const AdamScalars<T>& s) {
  using std::sqrt;  // float stays float (and vectorises)
  if (Maximize) g = -g;
  const T decayed = p * s.decay;
  const T m1 = LerpFromSelf ? m + s.w1 * (g - m) : g - (g - m) * (T(1) - s.w1);
  const T v1 = v * s.beta2 + s.w2 * g * g;
  T second = v1;
  if (vmax != nullptr) {
    const T old = *vmax;
    second = (old > v1 || old != old) ? old : v1;  // torch.maximum: a NaN on either side propagates
    *vmax = second;
  }
  p = decayed - m1 / ((sqrt(second) * a + s.eps) * c);
  m = m1;
  v = v1;
}

}  // namespace lorambo
