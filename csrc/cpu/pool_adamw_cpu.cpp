// Slot-aware AdamW over many LoRA rank pools in one call, CPU (lorambo.optim.AdamW's step).
//
// For every pool i only the first ranks[i] slots along slot_dims[i] are read and written (rows
// of lora_A [capacity, in], columns of lora_B [out, capacity]). Each slot has its own Adam step
// count (slot_steps[i][j], float32), incremented here, and so its own bias correction; the
// per-element formula is in lorambo/adam_math.h. One pass over p, grad, m and v instead of the
// torch._foreach path's dozen list-wide passes, and no Python per pool.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
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

// fp16 pools: GCC does not vectorise the bit-level conversions (cpu_simd.h), so runs of at most
// kStage elements are widened into float buffers, updated by the float loops and rounded back
// once, with F16C where the CPU has it. Bitwise the same as computing on the elements directly.
constexpr int64_t kStage = 512;

struct HalfStage {
  float p[kStage], g[kStage], m[kStage], v[kStage], vmax[kStage];

  void load(const c10::Half* p_, const c10::Half* g_, const c10::Half* m_, const c10::Half* v_,
            const c10::Half* vmax_, int64_t n) {
    half_to_float(p_, p, n);
    half_to_float(g_, g, n);
    half_to_float(m_, m, n);
    half_to_float(v_, v, n);
    if (vmax_ != nullptr) half_to_float(vmax_, vmax, n);
  }
  void store(c10::Half* p_, c10::Half* m_, c10::Half* v_, c10::Half* vmax_, int64_t n) const {
    float_to_half(p, p_, n);
    float_to_half(m, m_, n);
    float_to_half(v, v_, n);
    if (vmax_ != nullptr) float_to_half(vmax, vmax_, n);
  }
};

template <bool Max, bool Low>
void update_active_half(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor* max_sq, int64_t dim, int64_t rank,
                        const std::vector<float>& a, const std::vector<float>& c, const AdamScalars<float>& s) {
  c10::Half* p = param.data_ptr<c10::Half>();
  const c10::Half* g = grad.data_ptr<c10::Half>();
  c10::Half* m = exp_avg.data_ptr<c10::Half>();
  c10::Half* v = exp_avg_sq.data_ptr<c10::Half>();
  c10::Half* vmax = max_sq != nullptr ? max_sq->data_ptr<c10::Half>() : nullptr;
  HalfStage stage;  // 10 KiB on the stack of whichever thread runs this pool
  float* sv = vmax != nullptr ? stage.vmax : nullptr;
  const int64_t rows = param.size(0), cols = param.size(1);
  // n elements from offset o of one row: all of slot `slot` (one_slot), or slots slot.. slot+n-1.
  auto run = [&](int64_t o, int64_t n, int64_t slot, bool one_slot) {
    stage.load(p + o, g + o, m + o, v + o, vmax ? vmax + o : nullptr, n);
    if (one_slot) {
      adam_slot_row<float, float, Max, Low, float>(stage.p, stage.g, stage.m, stage.v, sv, n, a[slot], c[slot], s);
    } else {
      adam_slot_columns<float, float, Max, Low, float>(stage.p, stage.g, stage.m, stage.v, sv, n, a.data() + slot,
                                                       c.data() + slot, s);
    }
    stage.store(p + o, m + o, v + o, vmax ? vmax + o : nullptr, n);
  };
  if (dim == 0) {  // slot j = row j, contiguous
    for (int64_t j = 0; j < rank; ++j) {
      for (int64_t k = 0; k < cols; k += kStage) run(j * cols + k, std::min(kStage, cols - k), j, true);
    }
  } else {  // slot j = column j: the first `rank` entries of every row
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < rank; k += kStage) run(r * cols + k, std::min(kStage, rank - k), k, false);
    }
  }
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
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (s.maximize) {
      (from_self ? update_active_half<true, true> : update_active_half<true, false>)(
          param, grad, exp_avg, exp_avg_sq, max_sq, dim, rank, a, c, s);
    } else {
      (from_self ? update_active_half<false, true> : update_active_half<false, false>)(
          param, grad, exp_avg, exp_avg_sq, max_sq, dim, rank, a, c, s);
    }
  } else if (s.maximize) {
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
                   beta1, beta2, eps, weight_decay);
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
