// The slot-aware AdamW update of one element, shared by the CPU and CUDA pool_adamw_ kernels
// (__host__ __device__), in the dtype of the pool and in the order of the torch._foreach path in
// lorambo/optim/adamw.py, so the three agree up to rounding:
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
};

// torch.lerp takes `self + w (end - self)` for |w| < 0.5 and `end - (end - self)(1 - w)`
// otherwise, so the first moment rounds as torch's does; w = 1 - beta1 is fixed per step.
template <typename T>
LORAMBO_ADAM_HD bool adam_lerp_from_self(T weight) {
  return weight < T(0.5) && weight > T(-0.5);
}

// 1 - beta^t as -expm1(t * log(beta)) in T (accurate for beta close to 1); 1 for beta = 0.
// log_beta is log(beta) rounded to T, as torch rounds a Python float scalar to the tensor's dtype.
template <typename T>
LORAMBO_ADAM_HD T adam_bias_correction(T t, T log_beta, bool beta_is_zero) {
  using std::expm1;  // the float overload for float (C's ::expm1 would compute in double)
  return beta_is_zero ? T(1) : -expm1(t * log_beta);
}

// a = rsqrt(bc2), c = bc1 / lr (inf at lr = 0: the update is then exactly 0). The two per-step
// choices are template flags, so a CPU loop over elements has no control flow and vectorises
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

// The flags read from `s` (CUDA: a uniform branch per element).
template <typename T>
LORAMBO_ADAM_HD void adam_element(T& p, T g, T& m, T& v, T* vmax, T a, T c, const AdamScalars<T>& s) {
  const bool from_self = adam_lerp_from_self(s.w1);
  if (s.maximize) {
    from_self ? adam_element_fixed<T, true, true>(p, g, m, v, vmax, a, c, s)
              : adam_element_fixed<T, true, false>(p, g, m, v, vmax, a, c, s);
  } else {
    from_self ? adam_element_fixed<T, false, true>(p, g, m, v, vmax, a, c, s)
              : adam_element_fixed<T, false, false>(p, g, m, v, vmax, a, c, s);
  }
}

// The same on a stored element of type S (bf16/fp16 pools): widened to the compute type T
// (float), updated, and rounded once per tensor, where the torch._foreach path rounds after
// every operation. For S == T the casts vanish.
template <typename S, typename T>
LORAMBO_ADAM_HD void adam_stored(S& p, S g, S& m, S& v, S* vmax, T a, T c, const AdamScalars<T>& s) {
  T pt = static_cast<T>(p), mt = static_cast<T>(m), vt = static_cast<T>(v);
  T mx = vmax != nullptr ? static_cast<T>(*vmax) : T(0);
  adam_element<T>(pt, static_cast<T>(g), mt, vt, vmax != nullptr ? &mx : nullptr, a, c, s);
  p = static_cast<S>(pt);
  m = static_cast<S>(mt);
  v = static_cast<S>(vt);
  if (vmax != nullptr) *vmax = static_cast<S>(mx);
}

}  // namespace lorambo
