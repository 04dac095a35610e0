// Operator schemas (TORCH_LIBRARY(lorambo)), CPU registrations, the LoRA op's autograd, and the
// Python module lorambo._C. Fake (meta) implementations live in lorambo/ext/fake.py, which the
// dispatcher imports on demand (set_python_module), so torch.compile can trace every op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>

#include "lorambo/ops.h"
#include "lorambo/philox.h"

namespace lorambo {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const std::optional<at::Tensor>&, const at::Tensor&,
                                                            const at::Tensor&, int64_t, double, double, int64_t)>
fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorambo::lora_linear_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, int64_t, double, double, int64_t)>();
  return op;
}

c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, double, double, int64_t, std::array<bool, 5>)>
bwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorambo::lora_linear_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, double, double, int64_t,
                           std::array<bool, 5>)>();
  return op;
}

at::Tensor call_dropout_mask(const at::Tensor& x, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lorambo::dropout_mask", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(x, p, seed);
}

at::Tensor undefined_if_empty(const at::Tensor& g, bool wanted) { return wanted ? g : at::Tensor(); }

// What the backward keeps of x: x itself where it reads its values (dA_r at rank > 0, dW), else
// a zero-stride stand-in of its shape, so that a rank-0 layer holds what the frozen layer holds.
at::Tensor saved_input(const at::Tensor& x, const at::Tensor& weight, int64_t rank) {
  if (rank > 0 || weight.requires_grad()) return x;
  return at::zeros({}, x.options()).expand(x.sizes());
}

// Autograd for lorambo::lora_linear. Without create_graph the backward is one call of
// lora_linear_bwd (hand-fused kernels); with create_graph (Hessian-vector products) the same
// formulas run as differentiable ATen ops on the saved inputs, so double backward is exact.
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, int64_t rank, double scaling, double dropout_p,
                            int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, t] = fwd_op().call(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed);
    ctx->save_for_backward({saved_input(x, weight, rank), weight, lora_A, lora_B, t});
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &t = saved[4];
    const int64_t r = ctx->saved_data["rank"].toInt();
    const double s = ctx->saved_data["scaling"].toDouble();
    const double p = ctx->saved_data["p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges follow the tensor inputs that were defined: x, weight, [bias], lora_A, lora_B.
    const size_t e_a = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_a = ctx->needs_input_grad(e_a), need_bb = ctx->needs_input_grad(e_a + 1);
    at::Tensor g = grads[0];
    if (!g.defined()) g = at::zeros({x.size(0), weight.size(0)}, x.options());
    at::Tensor gx, gw, gb, ga, gbb;
    if (at::GradMode::is_enabled()) {
      // in the forward's dtypes, also when backward() runs inside an autocast region
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      const at::Tensor mask = p > 0.0 ? call_dropout_mask(x.detach(), p, seed) : at::Tensor();
      const at::Tensor xd = mask.defined() ? x * mask : x;
      const at::Tensor a_r = lora_A.narrow(0, 0, r), b_r = lora_B.narrow(1, 0, r);
      if (need_x) {
        gx = g.mm(weight);
        if (r > 0) {
          at::Tensor lx = g.mm(b_r).mm(a_r) * s;
          gx = gx + (mask.defined() ? lx * mask : lx);
        }
      }
      if (need_w) gw = g.t().mm(x);
      if (need_b) gb = g.sum(0);
      if (need_a) ga = at::constant_pad_nd(g.mm(b_r).t().mm(xd) * s, {0, 0, 0, lora_A.size(0) - r});
      if (need_bb) gbb = at::constant_pad_nd(g.t().mm(xd.mm(a_r.t())) * s, {0, lora_B.size(1) - r});
    } else {
      const std::array<bool, 5> mask = {need_x, need_w, need_b, need_a, need_bb};
      auto out = bwd_op().call(g, x, weight, lora_A, lora_B, t, r, s, p, seed, mask);
      gx = undefined_if_empty(std::get<0>(out), need_x);
      gw = undefined_if_empty(std::get<1>(out), need_w);
      gb = undefined_if_empty(std::get<2>(out), need_b);
      ga = undefined_if_empty(std::get<3>(out), need_a);
      gbb = undefined_if_empty(std::get<4>(out), need_bb);
    }
    return {gx, gw, gb, ga, gbb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t rank, double scaling,
                                double dropout_p, int64_t seed) {
  return LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed);
}

// Below autograd (inference mode, or tracing): the forward alone.
at::Tensor lora_linear_composite(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t rank, double scaling,
                                 double dropout_p, int64_t seed) {
  return std::get<0>(fwd_op().call(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed));
}

// Wrapper so the schema's bool[5] maps onto std::array<bool, 5>.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& t, int64_t rank, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> output_mask) {
  return lora_linear_bwd_cpu(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed, output_mask);
}

// Known-answer check of the shared Philox header from Python (tests compare with Random123).
std::vector<int64_t> philox_block(std::vector<int64_t> counter, std::vector<int64_t> key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "_philox4x32_10: counter needs 4 words and key 2");
  const philox::U4 out = philox::philox4x32_10(
      philox::U4{static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
                 static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3])},
      static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {static_cast<int64_t>(out.x), static_cast<int64_t>(out.y), static_cast<int64_t>(out.z),
          static_cast<int64_t>(out.w)};
}

}  // namespace
}  // namespace lorambo

TORCH_LIBRARY(lorambo, m) {
  m.set_python_module("lorambo.ext.fake");
  // Multi-tensor reductions: float64 [rows, len(xs)]; float32 accumulation inside each chunk of
  // 16k elements (float64 for float64 inputs), chunks summed in float64 in a fixed order.
  m.def("multi_dot(Tensor[] xs, Tensor[] ys, int rows=1) -> Tensor");
  m.def("multi_sq_norm(Tensor[] xs, int rows=1) -> Tensor");
  // Philox probes written in place: element j of tensors[i] takes stream position offsets[i] + j.
  m.def("probe_fill_(Tensor(a!)[] tensors, int seed, int[] offsets, str distribution) -> ()");
  // Pool maintenance in place: slot j of tensors[i] (along slot_dims[i]) takes old slot maps[i][j],
  // or zeros for -1.
  m.def("pool_remap_(Tensor(a!)[] tensors, int[] slot_dims, Tensor[] maps) -> ()");
  // Slot-aware AdamW on the first ranks[i] slots of every pool (lorambo.optim.AdamW); amsgrad
  // when max_exp_avg_sqs is not empty; slot_steps are incremented.
  m.def("pool_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] slot_steps, int[] slot_dims, int[] ranks, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
  // tensors[i] += value for one-element tensors (optimizer step counts), in place.
  m.def("scalars_add_(Tensor(a!)[] tensors, float value) -> ()");
  // Every tensor zeroed in place (the inactive slots of pools, after an optimizer step).
  m.def("zero_views_(Tensor(a!)[] tensors) -> ()");
  m.def("dropout_mask(Tensor x, float p, int seed) -> Tensor");
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, int rank, "
        "float scaling, float dropout_p=0.0, int seed=0) -> Tensor");
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, int rank, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, "
        "int rank, float scaling, float dropout_p, int seed, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorambo, CPU, m) {
  m.impl("multi_dot", &lorambo::multi_dot_cpu);
  m.impl("multi_sq_norm", &lorambo::multi_sq_norm_cpu);
  m.impl("probe_fill_", &lorambo::probe_fill_cpu);
  m.impl("pool_remap_", &lorambo::pool_remap_cpu);
  m.impl("pool_adamw_", &lorambo::pool_adamw_cpu);
  m.impl("dropout_mask", &lorambo::dropout_mask_cpu);
  m.impl("scalars_add_", &lorambo::scalars_add_cpu);
  m.impl("zero_views_", &lorambo::zero_views_cpu);
  m.impl("lora_linear_fwd", &lorambo::lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lorambo::lora_linear_bwd_cpu_impl);
}

TORCH_LIBRARY_IMPL(lorambo, Autograd, m) {
  m.impl("lora_linear", &lorambo::lora_linear_autograd);
  // A constant of (shape, p, seed): never differentiable, so autograd passes straight through.
  m.impl("dropout_mask", torch::CppFunction::makeFallthrough());
  // No derivative: a backward through a reduction of tensors that require grad raises ("the
  // derivative for lorambo::multi_dot is not implemented") instead of leaving their .grad None.
  m.impl("multi_dot", torch::autograd::autogradNotImplementedFallback());
  m.impl("multi_sq_norm", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(lorambo, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lorambo::lora_linear_composite);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorambo compiled extension: ops are registered under torch.ops.lorambo";
#ifdef LORAMBO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("_philox4x32_10", &lorambo::philox_block, "Philox4x32-10 of (counter[4], key[2]) -> 4 words");
}
