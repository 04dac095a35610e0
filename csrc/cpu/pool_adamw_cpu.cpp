// Slot-aware AdamW over many LoRA rank pools in one call, CPU (lorambo.optim.AdamW's step).
//
// For every pool i only the first ranks[i] slots along slot_dims[i] are read and written (rows
// of lora_A [capacity, in], columns of lora_B [out, capacity]). Each slot has its own Adam step
// count (slot_steps[i][j], float32), incremented here, and so its own bias correction. Per
// element, in the pool's dtype and in the order of the torch._foreach path in
// lorambo/optim/adamw.py, which it replaces on the CPU:
//   g = maximize ? -grad : grad;  p *= 1 - lr * weight_decay
//   m = lerp(m, g, 1 - beta1);     v = v * beta2 + (1 - beta2) * g * g;  vmax = max(vmax, v) (amsgrad)
//   p -= m / ((sqrt(amsgrad ? vmax : v) * rsqrt(bc2_j) + eps) * (bc1_j / lr)),  bc_j = 1 - beta^t_j
// One pass over p, grad, m and v instead of a dozen list-wide passes, and no Python per pool.
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "lorambo/cpu_parallel.h"
#include "lorambo/cpu_simd.h"
#include "lorambo/ops.h"
#include "lorambo/plan.h"

namespace lorambo {
namespace {

constexpr const char* kOp = "lorambo::pool_adamw_";

template <typename T>
struct AdamScalars {
  T decay, w1, beta2, w2, eps;  // decay = 1 - lr * weight_decay, w1 = 1 - beta1, w2 = 1 - beta2
  bool maximize;
};

// torch.lerp's two-sided formula, so the first moment rounds as torch's does.
template <typename T>
inline T lerp(T self, T end, T weight) {
  return std::abs(weight) < T(0.5) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

template <typename T>
inline void adam_element(T& p, T g, T& m, T& v, T* vmax, T a, T c, const AdamScalars<T>& s) {
  if (s.maximize) g = -g;
  const T decayed = p * s.decay;
  const T m1 = lerp(m, g, s.w1);
  const T v1 = v * s.beta2 + s.w2 * g * g;
  T second = v1;
  if (vmax != nullptr) {
    second = (*vmax > v1 || std::isnan(*vmax)) ? *vmax : v1;  // torch.maximum: NaN propagates
    *vmax = second;
  }
  p = decayed - m1 / ((std::sqrt(second) * a + s.eps) * c);
  m = m1;
  v = v1;
}

// n contiguous elements of one slot (a row of lora_A): one coefficient pair for all of them.
template <typename T>
LORAMBO_CLONES void adam_slot_row(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, T a, T c,
                                  AdamScalars<T> s) {
  if (vmax != nullptr) {
    for (int64_t i = 0; i < n; ++i) adam_element(p[i], g[i], m[i], v[i], vmax + i, a, c, s);
    return;
  }
  for (int64_t i = 0; i < n; ++i) adam_element<T>(p[i], g[i], m[i], v[i], nullptr, a, c, s);
}

// The first n slots of one row of lora_B: slot j has coefficients a[j], c[j].
template <typename T>
LORAMBO_CLONES void adam_slot_columns(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, const T* a,
                                      const T* c, AdamScalars<T> s) {
  if (vmax != nullptr) {
    for (int64_t j = 0; j < n; ++j) adam_element(p[j], g[j], m[j], v[j], vmax + j, a[j], c[j], s);
    return;
  }
  for (int64_t j = 0; j < n; ++j) adam_element<T>(p[j], g[j], m[j], v[j], nullptr, a[j], c[j], s);
}

// 1 - beta^t, as -expm1(t * log(beta)) in T (accurate for beta close to 1), 1 for beta = 0.
template <typename T>
inline T bias_correction(T t, double beta) {
  return beta == 0.0 ? T(1) : -std::expm1(t * static_cast<T>(std::log(beta)));
}

void check_list(const char* name, at::TensorList ts, const at::TensorList& params, size_t count, bool same_shape) {
  TORCH_CHECK(ts.size() == count, kOp, ": ", name, " has ", ts.size(), " tensors but params has ", count);
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const std::string what = std::string(name) + "[" + std::to_string(i) + "]";
    TORCH_CHECK(t.device().is_cpu(), kOp, ": ", what, " is on ", t.device(), "; this is the CPU implementation");
    TORCH_CHECK(t.is_contiguous(), kOp, ": ", what, " is not contiguous");
    if (same_shape) {
      TORCH_CHECK(t.sizes() == params[i].sizes(), kOp, ": ", what, " has shape ", shape_str(t.sizes()),
                  " but params[", i, "] has ", shape_str(params[i].sizes()));
      TORCH_CHECK(t.scalar_type() == params[i].scalar_type(), kOp, ": ", what, " is ", t.scalar_type(),
                  " but params[", i, "] is ", params[i].scalar_type());
    }
  }
}

template <typename T>
void update_pool(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                 const at::Tensor* max_sq, const at::Tensor& slot_step, int64_t dim, int64_t rank, double lr,
                 double beta1, double beta2, const AdamScalars<T>& s) {
  float* steps = slot_step.data_ptr<float>();
  std::vector<T> a(rank), c(rank);
  for (int64_t j = 0; j < rank; ++j) {
    steps[j] += 1.0f;
    const T t = static_cast<T>(steps[j]);
    a[j] = T(1) / std::sqrt(bias_correction(t, beta2));
    c[j] = bias_correction(t, beta1) / static_cast<T>(lr);  // lr = 0: inf, and the update is exactly 0
  }
  T* p = param.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  T* m = exp_avg.data_ptr<T>();
  T* v = exp_avg_sq.data_ptr<T>();
  T* vmax = max_sq != nullptr ? max_sq->data_ptr<T>() : nullptr;
  const int64_t rows = param.size(0), cols = param.size(1);
  if (dim == 0) {  // slot j = row j, contiguous
    for (int64_t j = 0; j < rank; ++j) {
      const int64_t o = j * cols;
      adam_slot_row(p + o, g + o, m + o, v + o, vmax ? vmax + o : nullptr, cols, a[j], c[j], s);
    }
  } else {  // slot j = column j: the first `rank` entries of every row
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * cols;
      adam_slot_columns(p + o, g + o, m + o, v + o, vmax ? vmax + o : nullptr, rank, a.data(), c.data(), s);
    }
  }
}

}  // namespace

void pool_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList slot_steps, at::IntArrayRef slot_dims,
                    at::IntArrayRef ranks, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool maximize) {
  const size_t count = params.size();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  check_list("params", params, params, count, false);
  check_list("grads", grads, params, count, true);
  check_list("exp_avgs", exp_avgs, params, count, true);
  check_list("exp_avg_sqs", exp_avg_sqs, params, count, true);
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, params, count, true);
  check_list("slot_steps", slot_steps, params, count, false);
  TORCH_CHECK(slot_dims.size() == count && ranks.size() == count, kOp, ": slot_dims has ", slot_dims.size(),
              " and ranks has ", ranks.size(), " entries but params has ", count);
  TORCH_CHECK(lr >= 0.0 && std::isfinite(lr), kOp, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, kOp, ": betas must be in [0, 1), got (",
              beta1, ", ", beta2, ")");
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.dim() == 2, kOp, ": params[", i, "] must be a 2-D pool, got shape ", shape_str(p.sizes()));
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, kOp, ": params[", i, "] is ",
                p.scalar_type(), "; float32 and float64 pools are supported");
    TORCH_CHECK(slot_dims[i] == 0 || slot_dims[i] == 1, kOp, ": slot_dims[", i, "] = ", slot_dims[i],
                " must be 0 (rows) or 1 (columns)");
    const int64_t capacity = p.size(slot_dims[i]);
    TORCH_CHECK(ranks[i] >= 0 && ranks[i] <= capacity, kOp, ": ranks[", i, "] = ", ranks[i],
                " is outside [0, ", capacity, "] for params[", i, "] of shape ", shape_str(p.sizes()));
    const at::Tensor& st = slot_steps[i];
    TORCH_CHECK(st.scalar_type() == at::kFloat && st.dim() == 1 && st.size(0) == capacity, kOp, ": slot_steps[", i,
                "] must be a float32 vector of ", capacity, " slot counts, got ", st.scalar_type(), " ",
                shape_str(st.sizes()));
  }
  parallel_items(
      static_cast<int64_t>(count), [&](int64_t i) { return ranks[i] * params[i].size(1 - slot_dims[i]); },
      [&](int64_t i) {
        if (ranks[i] == 0) return;
        const at::Tensor* max_sq = amsgrad ? &max_exp_avg_sqs[i] : nullptr;
        AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "pool_adamw_", [&] {
          const AdamScalars<scalar_t> s{static_cast<scalar_t>(1.0 - lr * weight_decay),
                                        static_cast<scalar_t>(1.0 - beta1), static_cast<scalar_t>(beta2),
                                        static_cast<scalar_t>(1.0 - beta2), static_cast<scalar_t>(eps), maximize};
          update_pool<scalar_t>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], max_sq, slot_steps[i],
                                slot_dims[i], ranks[i], lr, beta1, beta2, s);
        });
      });
}

}  // namespace lorambo
