// Validation and work plans for the multi-tensor ops (shared by the CPU and CUDA paths).
#include "lorambo/plan.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>

namespace lorambo {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

int32_t dtype_code(const char* op, const std::string& what, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(false, op, ": ", what, " has dtype ", t,
                  "; supported dtypes are float32, float64, bfloat16 and float16");
  }
  return -1;
}

at::Device check_same_device(const char* op, const char* name, at::TensorList ts, const at::Device* device) {
  at::Device ref = device ? *device : (ts.empty() ? at::Device(at::kCPU) : ts[0].device());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].defined(), op, ": ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(ts[i].device() == ref, op, ": ", name, "[", i, "] is on ", ts[i].device(),
                " but the other tensors are on ", ref, "; all tensors must be on one device");
  }
  return ref;
}

void check_disjoint(const char* op, const std::vector<NamedList>& lists) {
  struct Span {
    uintptr_t lo, hi;
    size_t list, index;
  };
  std::vector<Span> spans;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < lists[l].tensors.size(); ++i) {
      const at::Tensor& t = lists[l].tensors[i];
      if (t.numel() == 0 || !t.is_contiguous()) continue;
      const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({lo, lo + static_cast<uintptr_t>(t.numel()) * t.element_size(), l, i});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  // Sweep in address order: the earlier span reaching furthest, among all and among written ones.
  const Span* any = nullptr;
  const Span* written = nullptr;
  for (const Span& s : spans) {
    const Span* hit = written != nullptr && s.lo < written->hi ? written
                      : lists[s.list].written && any != nullptr && s.lo < any->hi ? any
                                                                                   : nullptr;
    TORCH_CHECK(hit == nullptr, op, ": ", lists[hit->list].name, "[", hit->index, "] and ", lists[s.list].name, "[",
                s.index, "] share memory; pass every tensor that is written once, in one place");
    if (any == nullptr || s.hi > any->hi) any = &s;
    if (lists[s.list].written && (written == nullptr || s.hi > written->hi)) written = &s;
  }
}

static void split(std::vector<ReduceItem>& items, int64_t tensor, int64_t start, int64_t len, int64_t chunk) {
  for (int64_t s = 0; s < len; s += chunk) items.push_back({tensor, start + s, std::min(chunk, len - s)});
}

ReducePlan plan_reduce(const char* op, at::TensorList xs, at::TensorList ys, bool pairs, int64_t rows,
                       int64_t chunk) {
  TORCH_CHECK(rows >= 1, op, ": rows must be >= 1, got ", rows);
  if (pairs) {
    TORCH_CHECK(xs.size() == ys.size(), op, ": xs has ", xs.size(), " tensors but ys has ", ys.size(),
                "; the lists must pair up");
  }
  ReducePlan plan;
  plan.rows = rows;
  plan.count = static_cast<int64_t>(xs.size());
  plan.device = check_same_device(op, "xs", xs);
  if (pairs) check_same_device(op, "ys", ys, &plan.device);
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string xi = "xs[" + std::to_string(i) + "]";
    plan.dtx.push_back(dtype_code(op, xi, xs[i].scalar_type()));
    if (pairs) {
      const std::string yi = "ys[" + std::to_string(i) + "]";
      plan.dty.push_back(dtype_code(op, yi, ys[i].scalar_type()));
      TORCH_CHECK(xs[i].sizes() == ys[i].sizes(), op, ": ", xi, " has shape ", shape_str(xs[i].sizes()),
                  " but ", yi, " has shape ", shape_str(ys[i].sizes()), "; pairs must have equal shapes");
    }
    if (rows > 1) {
      TORCH_CHECK(xs[i].dim() >= 1 && xs[i].size(0) == rows, op, ": ", xi, " has shape ",
                  shape_str(xs[i].sizes()), " but rows=", rows, " needs a leading dimension of ", rows);
    }
    plan.xs.push_back(xs[i].contiguous());
    if (pairs) plan.ys.push_back(ys[i].contiguous());
  }
  // Items ordered by output index o = p * count + i, so each output owns a contiguous range.
  plan.out_begin.reserve(rows * plan.count + 1);
  for (int64_t p = 0; p < rows; ++p) {
    for (int64_t i = 0; i < plan.count; ++i) {
      plan.out_begin.push_back(static_cast<int64_t>(plan.items.size()));
      const int64_t per_row = plan.xs[i].numel() / rows;
      split(plan.items, i, p * per_row, per_row, chunk);
    }
  }
  plan.out_begin.push_back(static_cast<int64_t>(plan.items.size()));
  return plan;
}

int32_t parse_distribution(const char* op, c10::string_view name) {
  if (name == "rademacher") return 0;
  if (name == "gaussian" || name == "normal") return 1;
  if (name == "uniform") return 2;
  TORCH_CHECK(false, op, ": distribution must be 'rademacher', 'gaussian' or 'uniform', got '",
              std::string(name), "'");
  return -1;
}

void check_seed(const char* op, int64_t seed) {
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
}

void check_dropout(const char* op, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  if (p > 0.0) check_seed(op, seed);
}

int32_t check_dropout_mask(const char* op, const at::Tensor& x, double p, int64_t seed) {
  check_dropout(op, p, seed);
  const int32_t code = dtype_code(op, "x", x.scalar_type());
  // the mask of a layer input [..., K] (the op's callers pass x2 [M, K] or x [..., K]); a 0-d x is none
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., K], got a 0-d tensor");
  return code;
}

// Contiguous tensors are filled in place by parallel items, the others through a staging tensor
// copied back afterwards: where two targets share an element, the order of those writes would
// decide its value. Every pair whose address spans cross is refused; for a non-contiguous tensor
// the span runs from its first element to its last, so views interleaving in one buffer (two
// columns of a matrix) are refused too: fill the tensor they view instead.
static void check_fill_disjoint(const char* op, at::TensorList tensors) {
  struct Span {
    uintptr_t lo, hi;
    size_t index;
  };
  std::vector<Span> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    int64_t last = 0;  // element offset of the last element (strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>(last + 1) * t.element_size(), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  const Span* reach = nullptr;  // the earlier span reaching furthest
  for (const Span& s : spans) {
    if (reach != nullptr && s.lo < reach->hi) {
      const size_t a = std::min(reach->index, s.index), b = std::max(reach->index, s.index);
      TORCH_CHECK(!(tensors[a].is_contiguous() && tensors[b].is_contiguous()), op, ": tensors[", a, "] and tensors[",
                  b, "] share memory; pass every tensor that is written once, in one place");
      TORCH_CHECK(false, op, ": tensors[", a, "] (shape ", shape_str(tensors[a].sizes()), ", strides ",
                  shape_str(tensors[a].strides()), ") and tensors[", b, "] (shape ", shape_str(tensors[b].sizes()),
                  ", strides ", shape_str(tensors[b].strides()), ") lie in one stretch of memory, and one of them is "
                  "not contiguous: the order of the writes would decide any element they share. Fill the tensor "
                  "they are views of, or pass tensors in separate memory");
    }
    if (reach == nullptr || s.hi > reach->hi) reach = &s;
  }
}

FillPlan plan_fill(const char* op, at::TensorList tensors, int64_t seed, at::IntArrayRef offsets,
                   c10::string_view distribution, int64_t chunk) {
  TORCH_CHECK(tensors.size() == offsets.size(), op, ": tensors has ", tensors.size(), " entries but offsets has ",
              offsets.size(), "; give one stream offset per tensor");
  check_seed(op, seed);
  FillPlan plan;
  plan.seed = static_cast<uint64_t>(seed);
  plan.distribution = parse_distribution(op, distribution);
  plan.device = check_same_device(op, "tensors", tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string ti = "tensors[" + std::to_string(i) + "]";
    plan.dt.push_back(dtype_code(op, ti, tensors[i].scalar_type()));
    const int64_t n = tensors[i].numel();
    TORCH_CHECK(offsets[i] >= 0, op, ": offsets[", i, "] must be in [0, 2^63), got ", offsets[i]);
    TORCH_CHECK(offsets[i] <= std::numeric_limits<int64_t>::max() - n, op, ": offsets[", i, "] = ", offsets[i],
                " plus ", ti, ".numel() = ", n, " runs past the end of the stream (2^63)");
    TORCH_CHECK(at::has_internal_overlap(tensors[i]) != at::MemOverlap::Yes, op, ": ", ti, " (shape ",
                shape_str(tensors[i].sizes()), ", strides ", shape_str(tensors[i].strides()),
                ") has elements sharing memory (an expanded tensor?); each element takes its own value");
    plan.targets.push_back(tensors[i].is_contiguous() ? tensors[i] : at::empty_like(tensors[i], at::MemoryFormat::Contiguous));
    for (int64_t s = 0; s < n; s += chunk) {
      plan.items.push_back({static_cast<int64_t>(i), s, std::min(chunk, n - s), offsets[i] + s});
    }
  }
  check_fill_disjoint(op, tensors);
  return plan;
}

void finish_fill(FillPlan& plan, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].is_contiguous()) const_cast<at::Tensor&>(tensors[i]).copy_(plan.targets[i]);
  }
}

RemapPlan plan_remap(const char* op, at::TensorList tensors, at::IntArrayRef slot_dims, at::TensorList maps,
                     int64_t buffer_elems) {
  TORCH_CHECK(tensors.size() == slot_dims.size(), op, ": tensors has ", tensors.size(),
              " entries but slot_dims has ", slot_dims.size());
  TORCH_CHECK(tensors.size() == maps.size(), op, ": tensors has ", tensors.size(), " entries but maps has ",
              maps.size());
  RemapPlan plan;
  plan.device = check_same_device(op, "tensors", tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string ti = "tensors[" + std::to_string(i) + "]";
    dtype_code(op, ti, t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", ti, " (shape ", shape_str(t.sizes()), ", strides ",
                shape_str(t.strides()), ") is not contiguous; pool maintenance edits whole pools in place");
    TORCH_CHECK(t.dim() >= 1, op, ": ", ti, " is a scalar; a pool needs a slot dimension");
    int64_t d = slot_dims[i];
    TORCH_CHECK(d >= -t.dim() && d < t.dim(), op, ": slot_dims[", i, "] = ", d, " is out of range for ", ti,
                " with ", t.dim(), " dimensions");
    if (d < 0) d += t.dim();
    const at::Tensor& m = maps[i];
    TORCH_CHECK(m.defined() && m.device().is_cpu() && m.scalar_type() == at::kLong && m.dim() == 1, op,
                ": maps[", i, "] must be a 1-D int64 CPU tensor");
    RemapTensor rt;
    rt.cap = t.size(d);
    TORCH_CHECK(m.numel() == rt.cap, op, ": maps[", i, "] has ", m.numel(), " entries but ", ti,
                " has ", rt.cap, " slots along dim ", d);
    rt.outer = 1;
    rt.inner = 1;
    for (int64_t k = 0; k < d; ++k) rt.outer *= t.size(k);
    for (int64_t k = d + 1; k < t.dim(); ++k) rt.inner *= t.size(k);
    rt.elsize = static_cast<int64_t>(t.element_size());
    const at::Tensor mc = m.contiguous();
    const int64_t* src = mc.data_ptr<int64_t>();
    for (int64_t j = 0; j < rt.cap; ++j) {
      TORCH_CHECK(src[j] >= -1 && src[j] < rt.cap, op, ": maps[", i, "][", j, "] = ", src[j],
                  " is not a slot of ", ti, " (valid: -1 for zero, or 0..", rt.cap - 1, ")");
      if (src[j] != j) {
        rt.dst.push_back(j);
        rt.src.push_back(src[j]);
      }
    }
    const int64_t n = static_cast<int64_t>(rt.dst.size());
    if (n > 0 && rt.outer > 0 && rt.inner > 0) {
      // Staging buffer per item holds n x (outer rows) x (inner cols): widen inner first, then outer.
      const int64_t per = std::max<int64_t>(1, buffer_elems / n);
      const int64_t w = std::min(rt.inner, per);
      const int64_t g = w < rt.inner ? 1 : std::max<int64_t>(1, std::min(rt.outer, per / w));
      for (int64_t o = 0; o < rt.outer; o += g) {
        for (int64_t k = 0; k < rt.inner; k += w) {
          plan.items.push_back({static_cast<int64_t>(i), o, std::min(o + g, rt.outer), k, std::min(k + w, rt.inner)});
        }
      }
    }
    plan.tensors.push_back(std::move(rt));
  }
  // Items of one tensor run in parallel with items of the others: overlapping memory would race.
  check_disjoint(op, {{"tensors", tensors, true}});
  return plan;
}

// ------------------------------------------------------------------------------ pool AdamW
static void check_moments(const char* op, const char* name, at::TensorList ts, at::TensorList params,
                          const at::Device& device) {
  TORCH_CHECK(ts.size() == params.size(), op, ": ", name, " has ", ts.size(), " tensors but params has ",
              params.size());
  check_same_device(op, name, ts, &device);
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::string what = std::string(name) + "[" + std::to_string(i) + "]";
    TORCH_CHECK(ts[i].sizes() == params[i].sizes(), op, ": ", what, " has shape ", shape_str(ts[i].sizes()),
                " but params[", i, "] has ", shape_str(params[i].sizes()));
    TORCH_CHECK(ts[i].scalar_type() == params[i].scalar_type(), op, ": ", what, " is ", ts[i].scalar_type(),
                " but params[", i, "] is ", params[i].scalar_type());
    TORCH_CHECK(ts[i].is_contiguous(), op, ": ", what, " is not contiguous");
  }
}

void check_pool_adamw(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList slot_steps,
                      at::IntArrayRef slot_dims, at::IntArrayRef ranks, double lr, double beta1, double beta2,
                      double eps, double weight_decay) {
  const size_t count = params.size();
  const at::Device device = check_same_device(op, "params", params);
  TORCH_CHECK(slot_steps.size() == count, op, ": slot_steps has ", slot_steps.size(), " tensors but params has ",
              count);
  check_same_device(op, "slot_steps", slot_steps, &device);
  TORCH_CHECK(slot_dims.size() == count && ranks.size() == count, op, ": slot_dims has ", slot_dims.size(),
              " and ranks has ", ranks.size(), " entries but params has ", count);
  TORCH_CHECK(lr >= 0.0 && std::isfinite(lr), op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, op, ": betas must be in [0, 1), got (",
              beta1, ", ", beta2, ")");
  // torch.optim.AdamW's own checks (lorambo.optim.AdamW's constructor runs them): nan fails both
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ", weight_decay);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.dim() == 2, op, ": params[", i, "] must be a 2-D pool, got shape ", shape_str(p.sizes()));
    dtype_code(op, "params[" + std::to_string(i) + "]", p.scalar_type());  // float32/64, bfloat16, float16
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] is not contiguous");
    TORCH_CHECK(slot_dims[i] == 0 || slot_dims[i] == 1, op, ": slot_dims[", i, "] = ", slot_dims[i],
                " must be 0 (rows) or 1 (columns)");
    const int64_t capacity = p.size(slot_dims[i]);
    TORCH_CHECK(ranks[i] >= 0 && ranks[i] <= capacity, op, ": ranks[", i, "] = ", ranks[i], " is outside [0, ",
                capacity, "] for params[", i, "] of shape ", shape_str(p.sizes()));
    const at::Tensor& st = slot_steps[i];
    TORCH_CHECK(st.scalar_type() == at::kFloat && st.dim() == 1 && st.size(0) == capacity && st.is_contiguous(), op,
                ": slot_steps[", i, "] must be a contiguous float32 vector of ", capacity, " slot counts, got ",
                st.scalar_type(), " ", shape_str(st.sizes()));
  }
  check_moments(op, "grads", grads, params, device);
  check_moments(op, "exp_avgs", exp_avgs, params, device);
  check_moments(op, "exp_avg_sqs", exp_avg_sqs, params, device);
  if (!max_exp_avg_sqs.empty()) check_moments(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, device);
  check_disjoint(op, {{"params", params, true},
                      {"grads", grads, false},
                      {"exp_avgs", exp_avgs, true},
                      {"exp_avg_sqs", exp_avg_sqs, true},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, true},
                      {"slot_steps", slot_steps, true}});
}

}  // namespace lorambo
