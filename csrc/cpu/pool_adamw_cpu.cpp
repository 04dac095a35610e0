// Slot-aware AdamW over many LoRA rank pools in one call, CPU (lorambo.optim.AdamW's step).
//
// For every pool i only the first ranks[i] slots along slot_dims[i] are read and written (rows
// of lora_A [capacity, in], columns of lora_B [out, capacity]). Each slot has its own Adam step
// count (slot_steps[i][j], float32), incremented here, and so its own bias correction; the
// per-element formula is in lorambo/adam_math.h. One pass over p, grad, m and v instead of the
// torch._foreach path's dozen list-wide passes, and no Python per pool.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "lorambo/adam_math.h"
#include "lorambo/cpu_parallel.h"
#include "lorambo/cpu_simd.h"
#include "lorambo/ops.h"
#include "lorambo/plan.h"

namespace lorambo {
namespace {

constexpr const char* kOp = "lorambo::pool_adamw_";

// How a pool's elements are stored: bf16 as raw uint16 bits with c10's conversions written so
// that GCC vectorises them (round to nearest even, NaN -> 0x7FC0); the others as themselves.
template <typename S>
struct Stored {
  using raw = S;
  static auto load(S v) { return widen(v); }
  template <typename T>
  static S store(T v) { return static_cast<S>(v); }
};
template <>
struct Stored<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
};

// One element in storage S: widened to the compute type T, updated, rounded once.
template <typename S, typename T, bool Max, bool Low, typename R>
inline void adam_cpu(R& p, R g, R& m, R& v, R* vmax, T a, T c, const AdamScalars<T>& s) {
  T pt = Stored<S>::load(p), mt = Stored<S>::load(m), vt = Stored<S>::load(v);
  T mx = vmax != nullptr ? Stored<S>::load(*vmax) : T(0);
  adam_element_fixed<T, Max, Low>(pt, Stored<S>::load(g), mt, vt, vmax != nullptr ? &mx : nullptr, a, c, s);
  p = Stored<S>::store(pt);
  m = Stored<S>::store(mt);
  v = Stored<S>::store(vt);
  if (vmax != nullptr) *vmax = Stored<S>::store(mx);
}

// n contiguous elements of one slot (a row of lora_A): one coefficient pair for all of them.
// Storage S (raw type R), compute type T (float for bf16/fp16). The pools, gradients and moments
// are distinct tensors (restrict lets the loops vectorise).
template <typename S, typename T, bool Max, bool Low, typename R>
LORAMBO_CLONES void adam_slot_row(R* __restrict__ p, const R* __restrict__ g, R* __restrict__ m,
                                  R* __restrict__ v, R* __restrict__ vmax, int64_t n, T a, T c, AdamScalars<T> s) {
  if (vmax != nullptr) {
    for (int64_t i = 0; i < n; ++i) adam_cpu<S, T, Max, Low, R>(p[i], g[i], m[i], v[i], vmax + i, a, c, s);
    return;
  }
  for (int64_t i = 0; i < n; ++i) adam_cpu<S, T, Max, Low, R>(p[i], g[i], m[i], v[i], nullptr, a, c, s);
}

// The first n slots of one row of lora_B: slot j has coefficients a[j], c[j].
template <typename S, typename T, bool Max, bool Low, typename R>
LORAMBO_CLONES void adam_slot_columns(R* __restrict__ p, const R* __restrict__ g, R* __restrict__ m,
                                      R* __restrict__ v, R* __restrict__ vmax, int64_t n, const T* __restrict__ a,
                                      const T* __restrict__ c, AdamScalars<T> s) {
  if (vmax != nullptr) {
    for (int64_t j = 0; j < n; ++j) adam_cpu<S, T, Max, Low, R>(p[j], g[j], m[j], v[j], vmax + j, a[j], c[j], s);
    return;
  }
  for (int64_t j = 0; j < n; ++j) adam_cpu<S, T, Max, Low, R>(p[j], g[j], m[j], v[j], nullptr, a[j], c[j], s);
}

template <typename S, typename T, bool Max, bool Low>
void update_active(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor* max_sq, int64_t dim, int64_t rank,
                   const std::vector<T>& a, const std::vector<T>& c, const AdamScalars<T>& s) {
  using R = typename Stored<S>::raw;
  R* p = reinterpret_cast<R*>(param.data_ptr<S>());
  const R* g = reinterpret_cast<const R*>(grad.data_ptr<S>());
  R* m = reinterpret_cast<R*>(exp_avg.data_ptr<S>());
  R* v = reinterpret_cast<R*>(exp_avg_sq.data_ptr<S>());
  R* vmax = max_sq != nullptr ? reinterpret_cast<R*>(max_sq->data_ptr<S>()) : nullptr;
  const int64_t rows = param.size(0), cols = param.size(1);
  if (dim == 0) {  // slot j = row j, contiguous
    for (int64_t j = 0; j < rank; ++j) {
      const int64_t o = j * cols;
      adam_slot_row<S, T, Max, Low, R>(p + o, g + o, m + o, v + o, vmax ? vmax + o : nullptr, cols, a[j], c[j], s);
    }
  } else {  // slot j = column j: the first `rank` entries of every row
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * cols;
      adam_slot_columns<S, T, Max, Low, R>(p + o, g + o, m + o, v + o, vmax ? vmax + o : nullptr, rank, a.data(),
                                           c.data(), s);
    }
  }
}

template <typename S, typename T>
void update_pool(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                 const at::Tensor* max_sq, const at::Tensor& slot_step, int64_t dim, int64_t rank,
                 const AdamScalars<T>& s) {
  float* steps = slot_step.data_ptr<float>();
  std::vector<T> a(rank), c(rank);
  for (int64_t j = 0; j < rank; ++j) {
    steps[j] += 1.0f;
    adam_slot_coefficients(static_cast<T>(steps[j]), s, a[j], c[j]);
  }
  const bool from_self = adam_lerp_from_self(s.w1);
  if (s.maximize) {
    (from_self ? update_active<S, T, true, true> : update_active<S, T, true, false>)(
        param, grad, exp_avg, exp_avg_sq, max_sq, dim, rank, a, c, s);
  } else {
    (from_self ? update_active<S, T, false, true> : update_active<S, T, false, false>)(
        param, grad, exp_avg, exp_avg_sq, max_sq, dim, rank, a, c, s);
  }
}

}  // namespace

void pool_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList slot_steps, at::IntArrayRef slot_dims,
                    at::IntArrayRef ranks, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool maximize) {
  check_pool_adamw(kOp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slot_steps, slot_dims, ranks, lr,
                   beta1, beta2);
  const size_t count = params.size();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  parallel_items(
      static_cast<int64_t>(count), [&](int64_t i) { return ranks[i] * params[i].size(1 - slot_dims[i]); },
      [&](int64_t i) {
        if (ranks[i] == 0) return;
        const at::Tensor* max_sq = amsgrad ? &max_exp_avg_sqs[i] : nullptr;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "pool_adamw_", [&] {
          using T = at::opmath_type<scalar_t>;
          update_pool<scalar_t, T>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_sq, slot_steps[i],
                                   slot_dims[i], ranks[i],
                                   make_adam_scalars<T>(lr, beta1, beta2, eps, weight_decay, maximize));
        });
      });
}

}  // namespace lorambo
