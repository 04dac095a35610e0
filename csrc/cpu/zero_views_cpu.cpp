// Many tensors zeroed in one call, CPU: the inactive slots of LoRA pools after an optimizer step
// (lorambo/nn/inactive_slots.py), rows of lora_A and column blocks of lora_B. torch._foreach_zero_
// takes its per-tensor path on the CPU, and its fill walks a column block [out, n] element by
// element; here each contiguous run (a whole row block, or one row of a column block) is one
// memset. All-zero bytes are zero in every dtype (+0.0 for floating types), as zero_() writes.
#include <ATen/ATen.h>

#include <cstring>

#include "lorambo/ops.h"

namespace lorambo {

void zero_views_cpu(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) {
      continue;
    }
    const int64_t item = t.element_size();
    if (t.is_contiguous()) {
      std::memset(t.mutable_data_ptr(), 0, static_cast<size_t>(t.numel() * item));
    } else if (t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1)) {  // rows that do not overlap
      char* row = static_cast<char*>(t.mutable_data_ptr());
      const size_t run = static_cast<size_t>(t.size(1) * item);
      const int64_t step = t.stride(0) * item;
      for (int64_t r = 0; r < t.size(0); ++r, row += step) {
        std::memset(row, 0, run);
      }
    } else {
      t.zero_();
    }
  }
}

}  // namespace lorambo
