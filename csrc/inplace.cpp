// What torch's own in-place ops do around their kernels, for lorambo's in-place ops (every device):
// refuse, before anything is written, a write autograd could not follow (a tensor that requires
// grad while grad mode is on; an inference tensor outside inference mode), and bump the version
// counter of every written tensor afterwards, so that a backward reading a saved tensor changed
// since raises (a parameter stepped by pool_adamw_ before its backward ran) instead of computing
// with the new values. Written = the tensors of the arguments the schema marks (a!).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <vector>

namespace lorambo {
namespace {

std::vector<at::Tensor> written_tensors(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  std::vector<at::Tensor> out;
  for (size_t a = 0; a < args.size(); ++a) {
    if (args[a].alias_info() == nullptr || !args[a].alias_info()->isWrite()) continue;
    const c10::IValue& v = stack[first + a];
    if (v.isTensor()) {
      out.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) out.push_back(t);
    }
  }
  return out;
}

void check_writable(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  for (size_t a = 0; a < args.size(); ++a) {
    if (args[a].alias_info() == nullptr || !args[a].alias_info()->isWrite()) continue;
    const c10::IValue& v = stack[first + a];
    if (!v.isTensorList()) continue;
    const auto list = v.toTensorList();
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor t = list[i];
      TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()), op.schema().name(), ": ", args[a].name(),
                  "[", i, "] requires grad, and this in-place op has no derivative; call it under torch.no_grad() "
                  "(or on .detach())");
      TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op.schema().name(), ": ", args[a].name(),
                  "[", i, "] is an inference tensor, which cannot be updated in place outside torch.inference_mode()");
    }
  }
}

void inplace_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  check_writable(op, *stack);
  const std::vector<at::Tensor> written = written_tensors(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    if (!t.is_inference()) torch::autograd::increment_version(t);
  }
}

}  // namespace
}  // namespace lorambo

// Autograd runs for tensors with autograd keys; ADInplaceOrView for inference tensors outside
// inference mode (they have no autograd keys; torch includes ADInplaceOrView for them there).
#define LORAMBO_INPLACE_OPS(m)                                                                         \
  for (const char* name : {"probe_fill_", "pool_remap_", "pool_adamw_", "scalars_add_", "zero_views_"}) { \
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&lorambo::inplace_boxed>());                  \
  }

TORCH_LIBRARY_IMPL(lorambo, Autograd, m) { LORAMBO_INPLACE_OPS(m) }
TORCH_LIBRARY_IMPL(lorambo, ADInplaceOrView, m) { LORAMBO_INPLACE_OPS(m) }
