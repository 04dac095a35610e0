// One-element counters advanced in one call, CPU (lorambo.optim.AdamW adds 1 to every pool's
// torch-compatible step count at every step). torch._foreach_add_ takes its per-tensor path on
// the CPU, a TensorIterator per tensor: about 1.4 us per count, 130 us per step over 96 pools,
// more than a small pool's whole update.
#include <ATen/ATen.h>

#include "lorambo/ops.h"

namespace lorambo {

void scalars_add_cpu(at::TensorList tensors, double value) {
  for (size_t i = 0; i < tensors.size(); ++i) {  // all checked before any is changed
    TORCH_CHECK(tensors[i].numel() == 1, "lorambo::scalars_add_: tensors[", i, "] has ", tensors[i].numel(),
                " elements; expected one");
    // add_ of a float raises for integer and bool tensors: refused here, before any count changed
    TORCH_CHECK(at::isFloatingType(tensors[i].scalar_type()) || at::isComplexType(tensors[i].scalar_type()),
                "lorambo::scalars_add_: tensors[", i, "] has dtype ", tensors[i].scalar_type(),
                "; expected a floating-point or complex count");
  }
  for (const at::Tensor& t : tensors) {
    // float32 and float64 as torch's add_ computes them (one rounding of count + value in the
    // count's dtype); any other dtype through add_ itself
    if (t.scalar_type() == at::kFloat) {
      float* count = t.mutable_data_ptr<float>();
      *count = *count + static_cast<float>(value);
    } else if (t.scalar_type() == at::kDouble) {
      double* count = t.mutable_data_ptr<double>();
      *count = *count + value;
    } else {
      t.add_(value);
    }
  }
}

}  // namespace lorambo
