// Host-side validation and work plans shared by the CPU and CUDA implementations.
//
// A plan splits every tensor of a list into work items of at most `chunk` elements, so one
// parallel loop (CPU) or one kernel launch (CUDA) covers the whole list whatever the shapes.
// Every check raises through TORCH_CHECK with the op name, the list name, the index and the
// offending value: bad input is an error, never a crash.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lorambo {

// Dtype codes used inside kernels (one switch per work item, not per element).
enum DtypeCode : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

std::string shape_str(at::IntArrayRef shape);

// Code of a supported floating dtype, or a TORCH_CHECK naming `what` (e.g. "xs[3]").
int32_t dtype_code(const char* op, const std::string& what, at::ScalarType t);

// Every tensor on `device` (the first tensor's device when null); returns that device.
at::Device check_same_device(const char* op, const char* name, at::TensorList ts,
                             const at::Device* device = nullptr);

// Lists of contiguous tensors, by name, that one op works on in parallel items.
struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool written;
};

// No memory shared between a written tensor and any other listed tensor (two read-only ones may
// share): parallel items would race, or one would read what another has already updated. A
// TORCH_CHECK names both tensors. Only contiguous tensors are compared (a non-contiguous one is
// skipped: callers that accept them write them through a staging copy, one at a time).
void check_disjoint(const char* op, const std::vector<NamedList>& lists);

// ----------------------------------------------------------------------------- reductions
struct ReduceItem {
  int64_t tensor;  // list index
  int64_t start;   // first element (flat, contiguous order)
  int64_t len;     // number of elements
};

struct ReducePlan {
  std::vector<at::Tensor> xs, ys;       // contiguous (copies only for non-contiguous input)
  std::vector<int32_t> dtx, dty;        // dtype codes
  std::vector<ReduceItem> items;        // ordered by output index
  std::vector<int64_t> out_begin;       // items of output o: [out_begin[o], out_begin[o+1])
  int64_t rows = 1, count = 0;          // output is float64 [rows, count]
  at::Device device = at::kCPU;
};

// ys empty => squared norms. Each tensor is viewed as [rows, numel / rows] (rows > 1 needs a
// leading dimension of size rows); output (p, i) reduces row p of pair i.
ReducePlan plan_reduce(const char* op, at::TensorList xs, at::TensorList ys, bool pairs, int64_t rows,
                       int64_t chunk);

// --------------------------------------------------------------------------- probe fill
struct FillItem {
  int64_t tensor;
  int64_t start;  // first element in the tensor
  int64_t len;
  int64_t pos;    // Philox stream position of that element
};

struct FillPlan {
  std::vector<at::Tensor> targets;  // contiguous targets (temporaries for non-contiguous input)
  std::vector<int32_t> dt;
  std::vector<FillItem> items;
  uint64_t seed = 0;
  int32_t distribution = 0;
  at::Device device = at::kCPU;
};

int32_t parse_distribution(const char* op, c10::string_view name);

FillPlan plan_fill(const char* op, at::TensorList tensors, int64_t seed, at::IntArrayRef offsets,
                   c10::string_view distribution, int64_t chunk);

// Copy temporaries back into non-contiguous targets.
void finish_fill(FillPlan& plan, at::TensorList tensors);

// ------------------------------------------------------------------------ pool maintenance
// Tensor i is viewed as [outer, cap, inner] around its slot dimension. Slot j receives old slot
// src[j] (or zeros when src[j] == -1); only slots with src[j] != j are touched.
struct RemapTensor {
  int64_t outer, cap, inner, elsize;
  std::vector<int64_t> dst, src;  // the changed slots
};

struct RemapItem {
  int64_t tensor;
  int64_t o0, o1;  // outer range
  int64_t k0, k1;  // inner range
};

struct RemapPlan {
  std::vector<RemapTensor> tensors;
  std::vector<RemapItem> items;
  at::Device device = at::kCPU;
};

// `buffer_elems` bounds changed-slots x outer x inner per item (the staging buffer size).
RemapPlan plan_remap(const char* op, at::TensorList tensors, at::IntArrayRef slot_dims,
                     at::TensorList maps, int64_t buffer_elems);

// ------------------------------------------------------------------------------- checks
// lorambo::pool_adamw_: list lengths, one device, float32/64, bf16 or fp16 2-D contiguous pools with
// grads and moments of the same shape and dtype, slot_dims in {0, 1}, ranks within the pool,
// float32 slot counts [capacity], lr finite >= 0, betas in [0, 1), eps and weight_decay >= 0 (not
// nan); no written tensor sharing memory with another tensor (check_disjoint).
void check_pool_adamw(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList slot_steps,
                      at::IntArrayRef slot_dims, at::IntArrayRef ranks, double lr, double beta1, double beta2,
                      double eps, double weight_decay);
void check_seed(const char* op, int64_t seed);
void check_dropout(const char* op, double p, int64_t seed);
// lorambo::dropout_mask: check_dropout, a kernel dtype (returned, dtype_code's) and x [..., K] (not 0-d).
int32_t check_dropout_mask(const char* op, const at::Tensor& x, double p, int64_t seed);

}  // namespace lorambo
