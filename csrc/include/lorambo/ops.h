// Declarations of the lorambo:: op implementations (registered in csrc/ops.cpp and csrc/cuda/*.cu).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lorambo {

// Work-item sizes. Reductions: 16384 elements per item keeps float32 lane sums short (1024 terms
// per lane) and gives a 7B-like LoRA set (40M elements) ~2.5k items to balance over threads.
constexpr int64_t kReduceChunk = 16384;
constexpr int64_t kFillChunk = 16384;
// Pool remap staging buffer (elements per item): 16 KiB of float32 on the CPU.
constexpr int64_t kRemapBufferCpu = 4096;

// ------------------------------------------------------------------ CPU implementations
at::Tensor multi_dot_cpu(at::TensorList xs, at::TensorList ys, int64_t rows);
at::Tensor multi_sq_norm_cpu(at::TensorList xs, int64_t rows);
void probe_fill_cpu(at::TensorList tensors, int64_t seed, at::IntArrayRef offsets, c10::string_view distribution);
void pool_remap_cpu(at::TensorList tensors, at::IntArrayRef slot_dims, at::TensorList maps);
void pool_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList slot_steps, at::IntArrayRef slot_dims,
                    at::IntArrayRef ranks, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool maximize);
at::Tensor dropout_mask_cpu(const at::Tensor& x, double p, int64_t seed);
void scalars_add_cpu(at::TensorList tensors, double value);
void zero_views_cpu(at::TensorList tensors);

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       int64_t rank, double scaling, double dropout_p,
                                                       int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& t, int64_t rank, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> output_mask);

// ------------------------------------------- device-generic paths (ATen GEMMs; used for CUDA)
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_generic(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           int64_t rank, double scaling, double dropout_p,
                                                           int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_generic(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& t, int64_t rank, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> output_mask);

// Shape/dtype/device and scalar checks of the LoRA op (shared by every implementation): the
// checks of lorambo/ops/op_operands.py, for direct torch.ops.lorambo calls.
void check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     int64_t rank, double scaling, double dropout_p, int64_t seed);

// check_lora_args, then grad_y [M, N] and, where dB is asked for at rank > 0, t [M, rank], each
// in x's dtype and on x's device (shared by the CPU and the device-generic backward).
void check_lora_bwd_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& t, int64_t rank,
                         double scaling, double dropout_p, int64_t seed, bool need_lora_B);

}  // namespace lorambo
