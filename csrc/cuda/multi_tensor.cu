// CUDA implementations of the multi-tensor ops (apex multi_tensor_apply style) and the CUDA
// registrations of every lorambo op.
//
// One plan (csrc/plan.cpp, shared with the CPU) lists work items over the whole tensor list; the
// plan's tables go to the device in one pinned host-to-device copy, and one kernel launch covers
// all items (reductions add one tiny finalize kernel that sums each output's chunk partials in
// float64, in a fixed order, so results are deterministic). Each block handles one item and
// switches on the item's dtype once, not per element.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS headers), so
// .ci/compile_cuda.sh can compile this file against the CPU wheel's headers plus nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "lorambo/adam_math.h"
#include "lorambo/ops.h"
#include "lorambo/philox.h"
#include "lorambo/plan.h"

namespace lorambo {
namespace {

constexpr int kThreads = 256;
// Staging buffer of the remap kernel: 4096 elements x 8 bytes = 32 KiB of shared memory at most.
constexpr int64_t kRemapBufferCuda = 4096;

// Host int64 table -> device, through pinned memory (the caching host allocator keeps the
// pinned block alive until the copy has run on the current stream).
at::Tensor to_device(const std::vector<int64_t>& words, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

template <typename Fn>
__device__ __forceinline__ void with_type(int64_t code, Fn fn) {
  switch (code) {
    case kF32: fn(float{}); break;
    case kF64: fn(double{}); break;
    case kBF16: fn(c10::BFloat16{}); break;
    default: fn(c10::Half{}); break;
  }
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// Each thread adds kSumBlock products in the accumulation type A (float32 unless an operand is
// float64), then hands the block sum to a float64 total; the tree over threads is float64. As on
// the CPU (csrc/cpu/multi_tensor_cpu.cpp): |error| <= (8 u32 + 2000 u64) * sum |x y|. A float32
// total per thread rounds every add relative to a growing sum, which for a sum of squares (one
// sign) grows with the number of terms.
constexpr int kSumBlock = 8;

template <typename A, typename TX, typename TY>
__device__ void dot_item(const TX* x, const TY* y, int64_t len, double* partial) {
  __shared__ double shared[kThreads / 32];
  double total = 0.0;
  A block = 0;
  int in_block = 0;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    block += static_cast<A>(x[i]) * static_cast<A>(y[i]);
    if (++in_block == kSumBlock) {
      total += static_cast<double>(block);
      block = 0;
      in_block = 0;
    }
  }
  total = block_sum(total + static_cast<double>(block), shared);
  if (threadIdx.x == 0) *partial = total;
}

// tables: per tensor [x_ptr, y_ptr, dtx, dty]; items: [tensor, start, len].
__global__ void reduce_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ items, bool pairs,
                              double* __restrict__ partial) {
  const int64_t item = blockIdx.x;
  const int64_t t = items[3 * item], start = items[3 * item + 1], len = items[3 * item + 2];
  const void* xp = reinterpret_cast<const void*>(tensors[4 * t]);
  const void* yp = reinterpret_cast<const void*>(tensors[4 * t + 1]);
  const int64_t cx = tensors[4 * t + 2], cy = pairs ? tensors[4 * t + 3] : cx;
  with_type(cx, [&](auto tx) {
    using TX = decltype(tx);
    const TX* x = static_cast<const TX*>(xp) + start;
    with_type(cy, [&](auto ty) {
      using TY = decltype(ty);
      const TY* y = pairs ? static_cast<const TY*>(yp) + start : reinterpret_cast<const TY*>(x);
      if (cx == kF64 || cy == kF64) {
        dot_item<double>(x, y, len, partial + item);
      } else {
        dot_item<float>(x, y, len, partial + item);
      }
    });
  });
}

__global__ void finalize_kernel(const double* __restrict__ partial, const int64_t* __restrict__ out_begin,
                                int64_t outputs, double* __restrict__ out) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= outputs) return;
  double s = 0.0;
  for (int64_t i = out_begin[o]; i < out_begin[o + 1]; ++i) s += partial[i];
  out[o] = s;
}

at::Tensor run_reduce_cuda(const ReducePlan& plan, bool pairs) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int64_t outputs = plan.rows * plan.count;
  at::Tensor out = at::zeros({plan.rows, plan.count}, at::TensorOptions().dtype(at::kDouble).device(plan.device));
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  if (n_items == 0) return out;
  std::vector<int64_t> words;
  words.reserve(4 * plan.count + 3 * n_items + outputs + 1);
  for (int64_t i = 0; i < plan.count; ++i) {
    words.push_back(reinterpret_cast<int64_t>(plan.xs[i].const_data_ptr()));
    words.push_back(pairs ? reinterpret_cast<int64_t>(plan.ys[i].const_data_ptr()) : 0);
    words.push_back(plan.dtx[i]);
    words.push_back(pairs ? plan.dty[i] : plan.dtx[i]);
  }
  for (const ReduceItem& it : plan.items) {
    words.push_back(it.tensor);
    words.push_back(it.start);
    words.push_back(it.len);
  }
  words.insert(words.end(), plan.out_begin.begin(), plan.out_begin.end());
  const at::Tensor meta = to_device(words, plan.device);
  const int64_t* m = meta.const_data_ptr<int64_t>();
  at::Tensor partial = at::empty({n_items}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  reduce_kernel<<<static_cast<unsigned>(n_items), kThreads, 0, stream>>>(m, m + 4 * plan.count, pairs,
                                                                         partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<<<static_cast<unsigned>((outputs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), m + 4 * plan.count + 3 * n_items, outputs, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------ Philox fill
template <typename T>
__device__ __forceinline__ T value_at(const philox::U4& b, int e, int dist) {
  const uint32_t w = philox::word(b, e);
  if (dist == philox::kRademacher) return static_cast<T>(philox::rademacher(w));
  if (dist == philox::kGaussian) return static_cast<T>(static_cast<float>(philox::gaussian_at(b, e)));
  return static_cast<T>(philox::uniform_f32(w));
}
template <>
__device__ __forceinline__ double value_at<double>(const philox::U4& b, int e, int dist) {
  const uint32_t w = philox::word(b, e);
  if (dist == philox::kRademacher) return philox::rademacher(w);
  if (dist == philox::kGaussian) return philox::gaussian_at(b, e);
  return philox::uniform_f64(w);
}
// Same bit choices as the CPU (csrc/cpu/multi_tensor_cpu.cpp): uniforms keep the dtype's bits.
template <>
__device__ __forceinline__ c10::BFloat16 value_at<c10::BFloat16>(const philox::U4& b, int e, int dist) {
  const uint32_t w = philox::word(b, e);
  if (dist == philox::kUniform) return c10::BFloat16(static_cast<float>(w >> 24) * 0.00390625f);
  if (dist == philox::kRademacher) return c10::BFloat16(philox::rademacher(w));
  return c10::BFloat16(static_cast<float>(philox::gaussian_at(b, e)));
}
template <>
__device__ __forceinline__ c10::Half value_at<c10::Half>(const philox::U4& b, int e, int dist) {
  const uint32_t w = philox::word(b, e);
  if (dist == philox::kUniform) return c10::Half(static_cast<float>(w >> 21) * 0.00048828125f);
  if (dist == philox::kRademacher) return c10::Half(philox::rademacher(w));
  return c10::Half(static_cast<float>(philox::gaussian_at(b, e)));
}

// tables: per tensor [ptr, dtype]; items: [tensor, start, len, pos]. One thread per group of
// four stream positions (one Philox call).
__global__ void fill_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ items, uint64_t seed,
                            int dist) {
  const int64_t item = blockIdx.x;
  const int64_t t = items[4 * item], start = items[4 * item + 1], len = items[4 * item + 2];
  const uint64_t pos = static_cast<uint64_t>(items[4 * item + 3]);
  void* base = reinterpret_cast<void*>(tensors[2 * t]);
  const uint64_t g0 = pos >> 2, g1 = (pos + static_cast<uint64_t>(len) + 3) >> 2;
  with_type(tensors[2 * t + 1], [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(base) + start;  // out[j] has stream position pos + j
    for (uint64_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
      const philox::U4 b = philox::block(seed, g, philox::kDomainProbe);
      for (int e = 0; e < 4; ++e) {
        const uint64_t q = (g << 2) + e;
        if (q >= pos && q < pos + static_cast<uint64_t>(len)) out[q - pos] = value_at<T>(b, e, dist);
      }
    }
  });
}

template <typename T>
__global__ void dropout_mask_kernel(T* __restrict__ out, int64_t n, uint64_t seed, uint64_t threshold, T keep) {
  const uint64_t groups = (static_cast<uint64_t>(n) + 3) >> 2;
  for (uint64_t g = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const philox::U4 b = philox::block(seed, g, philox::kDomainDropout);
    for (int e = 0; e < 4; ++e) {
      const uint64_t q = (g << 2) + e;
      if (q < static_cast<uint64_t>(n)) out[q] = philox::word(b, e) >= threshold ? keep : static_cast<T>(0);
    }
  }
}

// ------------------------------------------------------------------------------ pool remap
// tables: per tensor [ptr, cap, inner, elsize, n_changed, pair_offset]; pairs: [dst, src]...;
// items: [tensor, o0, o1, k0, k1]. Phase 1 stages every changed slot of the item in shared
// memory, phase 2 writes them: in place and race-free, since items own disjoint regions.
template <typename W>
__device__ void remap_item(W* data, const int64_t* pairs, int64_t n, int64_t cap, int64_t inner, int64_t o0,
                           int64_t o1, int64_t k0, int64_t k1, W* buf) {
  const int64_t g = o1 - o0, w = k1 - k0, total = n * g * w;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t t = idx / (g * w), rem = idx % (g * w);
    const int64_t o = o0 + rem / w, k = k0 + rem % w;
    const int64_t src = pairs[2 * t + 1];
    buf[idx] = src < 0 ? W(0) : data[(o * cap + src) * inner + k];
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t t = idx / (g * w), rem = idx % (g * w);
    const int64_t o = o0 + rem / w, k = k0 + rem % w;
    data[(o * cap + pairs[2 * t]) * inner + k] = buf[idx];
  }
}

__global__ void remap_kernel(const int64_t* __restrict__ tensors, const int64_t* __restrict__ pairs,
                             const int64_t* __restrict__ items) {
  extern __shared__ __align__(8) unsigned char smem[];
  const int64_t* it = items + 5 * blockIdx.x;
  const int64_t* tt = tensors + 6 * it[0];
  void* data = reinterpret_cast<void*>(tt[0]);
  const int64_t cap = tt[1], inner = tt[2], elsize = tt[3], n = tt[4];
  const int64_t* p = pairs + 2 * tt[5];
  if (elsize == 2) {
    remap_item(static_cast<uint16_t*>(data), p, n, cap, inner, it[1], it[2], it[3], it[4],
               reinterpret_cast<uint16_t*>(smem));
  } else if (elsize == 4) {
    remap_item(static_cast<uint32_t*>(data), p, n, cap, inner, it[1], it[2], it[3], it[4],
               reinterpret_cast<uint32_t*>(smem));
  } else {
    remap_item(static_cast<uint64_t*>(data), p, n, cap, inner, it[1], it[2], it[3], it[4],
               reinterpret_cast<uint64_t*>(smem));
  }
}

}  // namespace

at::Tensor multi_dot_cuda(at::TensorList xs, at::TensorList ys, int64_t rows) {
  return run_reduce_cuda(plan_reduce("lorambo::multi_dot", xs, ys, true, rows, kReduceChunk), true);
}

at::Tensor multi_sq_norm_cuda(at::TensorList xs, int64_t rows) {
  return run_reduce_cuda(plan_reduce("lorambo::multi_sq_norm", xs, {}, false, rows, kReduceChunk), false);
}

void probe_fill_cuda(at::TensorList tensors, int64_t seed, at::IntArrayRef offsets, c10::string_view distribution) {
  FillPlan plan = plan_fill("lorambo::probe_fill_", tensors, seed, offsets, distribution, kFillChunk);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  if (n_items > 0) {
    const c10::cuda::CUDAGuard guard(plan.device);
    std::vector<int64_t> words;
    for (size_t i = 0; i < plan.targets.size(); ++i) {
      words.push_back(reinterpret_cast<int64_t>(plan.targets[i].data_ptr()));
      words.push_back(plan.dt[i]);
    }
    for (const FillItem& it : plan.items) words.insert(words.end(), {it.tensor, it.start, it.len, it.pos});
    const at::Tensor meta = to_device(words, plan.device);
    const int64_t* m = meta.const_data_ptr<int64_t>();
    fill_kernel<<<static_cast<unsigned>(n_items), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        m, m + 2 * plan.targets.size(), plan.seed, plan.distribution);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_fill(plan, tensors);
}

void pool_remap_cuda(at::TensorList tensors, at::IntArrayRef slot_dims, at::TensorList maps) {
  const RemapPlan plan = plan_remap("lorambo::pool_remap_", tensors, slot_dims, maps, kRemapBufferCuda);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  if (n_items == 0) return;
  const c10::cuda::CUDAGuard guard(plan.device);
  std::vector<int64_t> table, pairs, items;
  int64_t smem = 0;
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const RemapTensor& rt = plan.tensors[i];
    table.insert(table.end(), {reinterpret_cast<int64_t>(tensors[i].data_ptr()), rt.cap, rt.inner, rt.elsize,
                               static_cast<int64_t>(rt.dst.size()), static_cast<int64_t>(pairs.size() / 2)});
    for (size_t j = 0; j < rt.dst.size(); ++j) pairs.insert(pairs.end(), {rt.dst[j], rt.src[j]});
  }
  for (const RemapItem& it : plan.items) {
    const RemapTensor& rt = plan.tensors[it.tensor];
    items.insert(items.end(), {it.tensor, it.o0, it.o1, it.k0, it.k1});
    smem = std::max(smem, static_cast<int64_t>(rt.dst.size()) * (it.o1 - it.o0) * (it.k1 - it.k0) * rt.elsize);
  }
  // Items are sized by plan_remap to <= kRemapBufferCuda elements unless one item must hold more
  // changed slots than that (capacity > 4096): refuse rather than launch past shared memory.
  TORCH_CHECK(smem <= 48 * 1024, "lorambo::pool_remap_: ", smem, " bytes of staging per item exceed 48 KiB of ",
              "shared memory (more than 6144 changed slots in one pool); split the call");
  std::vector<int64_t> words(table);
  words.insert(words.end(), pairs.begin(), pairs.end());
  words.insert(words.end(), items.begin(), items.end());
  const at::Tensor meta = to_device(words, plan.device);
  const int64_t* m = meta.const_data_ptr<int64_t>();
  remap_kernel<<<static_cast<unsigned>(n_items), kThreads, static_cast<size_t>(smem),
                 c10::cuda::getCurrentCUDAStream()>>>(m, m + table.size(), m + table.size() + pairs.size());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------ pool AdamW
// Active elements of a pool, numbered slot-major for lora_A (slot j = row j, contiguous) and
// row-major over the first `rank` columns for lora_B. Per-tensor table (10 words): p, g, m, v,
// vmax (0 without amsgrad), slot steps, slot dim, rank, columns, dtype code; items: [tensor,
// start, len] in that numbering. Counts are read as steps + 1 here and incremented afterwards by
// slot_step_kernel (same stream), so no block reads a count another block has written.
constexpr int64_t kAdamChunk = 4096;
constexpr int kAdamWords = 10;

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
};

// One stored element: widened to the compute type T (float for bf16/fp16, as on the CPU),
// updated, rounded once. The per-step flags are read from `s`: a branch uniform over the launch.
template <typename S, typename T>
__device__ __forceinline__ void adam_stored(S& p, S g, S& m, S& v, S* vmax, T a, T c, const AdamScalars<T>& s) {
  T pt = static_cast<T>(p), mt = static_cast<T>(m), vt = static_cast<T>(v), gt = static_cast<T>(g);
  T mx = vmax != nullptr ? static_cast<T>(*vmax) : T(0);
  T* mxp = vmax != nullptr ? &mx : nullptr;
  const bool from_self = adam_lerp_from_self(s.w1);
  if (s.maximize) {
    from_self ? adam_element_fixed<T, true, true>(pt, gt, mt, vt, mxp, a, c, s)
              : adam_element_fixed<T, true, false>(pt, gt, mt, vt, mxp, a, c, s);
  } else {
    from_self ? adam_element_fixed<T, false, true>(pt, gt, mt, vt, mxp, a, c, s)
              : adam_element_fixed<T, false, false>(pt, gt, mt, vt, mxp, a, c, s);
  }
  p = static_cast<S>(pt);
  m = static_cast<S>(mt);
  v = static_cast<S>(vt);
  if (vmax != nullptr) *vmax = static_cast<S>(mx);
}

// Storage S, compute type T.
template <typename S, typename T>
__device__ void adam_item(const int64_t* tab, int64_t start, int64_t len, const AdamArgs& args) {
  S* p = reinterpret_cast<S*>(tab[0]);
  const S* g = reinterpret_cast<const S*>(tab[1]);
  S* m = reinterpret_cast<S*>(tab[2]);
  S* v = reinterpret_cast<S*>(tab[3]);
  S* vmax = reinterpret_cast<S*>(tab[4]);
  const float* steps = reinterpret_cast<const float*>(tab[5]);
  const int64_t dim = tab[6], rank = tab[7], cols = tab[8];
  const AdamScalars<T> s =
      make_adam_scalars<T>(args.lr, args.beta1, args.beta2, args.eps, args.weight_decay, args.maximize);
  for (int64_t e = start + threadIdx.x; e < start + len; e += blockDim.x) {
    int64_t j, off;
    if (dim == 0) {
      j = e / cols;
      off = e;
    } else {
      const int64_t row = e / rank;
      j = e - row * rank;
      off = row * cols + j;
    }
    T a, c;
    adam_slot_coefficients(static_cast<T>(steps[j] + 1.0f), s, a, c);
    adam_stored<S, T>(p[off], g[off], m[off], v[off], vmax != nullptr ? vmax + off : nullptr, a, c, s);
  }
}

__global__ void pool_adamw_kernel(const int64_t* __restrict__ tables, const int64_t* __restrict__ items,
                                  AdamArgs args) {
  const int64_t* it = items + 3 * blockIdx.x;
  const int64_t* tab = tables + kAdamWords * it[0];
  switch (tab[9]) {
    case kF64: adam_item<double, double>(tab, it[1], it[2], args); break;
    case kF32: adam_item<float, float>(tab, it[1], it[2], args); break;
    case kBF16: adam_item<c10::BFloat16, float>(tab, it[1], it[2], args); break;
    default: adam_item<c10::Half, float>(tab, it[1], it[2], args); break;
  }
}

__global__ void slot_step_kernel(const int64_t* __restrict__ tables) {
  const int64_t* tab = tables + kAdamWords * blockIdx.x;
  float* steps = reinterpret_cast<float*>(tab[5]);
  for (int64_t j = threadIdx.x; j < tab[7]; j += blockDim.x) steps[j] += 1.0f;
}

void pool_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList slot_steps, at::IntArrayRef slot_dims,
                     at::IntArrayRef ranks, double lr, double beta1, double beta2, double eps, double weight_decay,
                     bool maximize) {
  check_pool_adamw("lorambo::pool_adamw_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slot_steps,
                   slot_dims, ranks, lr, beta1, beta2, eps, weight_decay);
  std::vector<int64_t> tables, items;
  int64_t n_tensors = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (ranks[i] == 0) continue;
    const at::Tensor& p = params[i];
    const int64_t cols = p.size(1), active = ranks[i] * (slot_dims[i] == 0 ? cols : p.size(0));
    tables.insert(tables.end(), {reinterpret_cast<int64_t>(p.data_ptr()), reinterpret_cast<int64_t>(grads[i].data_ptr()),
                                 reinterpret_cast<int64_t>(exp_avgs[i].data_ptr()),
                                 reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr()),
                                 max_exp_avg_sqs.empty() ? 0 : reinterpret_cast<int64_t>(max_exp_avg_sqs[i].data_ptr()),
                                 reinterpret_cast<int64_t>(slot_steps[i].data_ptr()), slot_dims[i], ranks[i], cols,
                                 dtype_code("lorambo::pool_adamw_", "params", p.scalar_type())});
    for (int64_t s = 0; s < active; s += kAdamChunk) items.insert(items.end(), {n_tensors, s, std::min(kAdamChunk, active - s)});
    ++n_tensors;
  }
  if (n_tensors == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<int64_t> words(tables);
  words.insert(words.end(), items.begin(), items.end());
  const at::Tensor meta = to_device(words, params[0].device());
  const int64_t* m = meta.const_data_ptr<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const AdamArgs args{lr, beta1, beta2, eps, weight_decay, maximize};
  pool_adamw_kernel<<<static_cast<unsigned>(items.size() / 3), kThreads, 0, stream>>>(m, m + tables.size(), args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  slot_step_kernel<<<static_cast<unsigned>(n_tensors), kThreads, 0, stream>>>(m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dropout_mask_cuda(const at::Tensor& x, double p, int64_t seed) {
  const int32_t code = check_dropout_mask("lorambo::dropout_mask", x, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (p == 0.0) return out.fill_(1);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const uint64_t threshold = philox::dropout_threshold(p);
  const double scale = 1.0 / (1.0 - p);
  const int64_t groups = (n + 3) / 4;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const uint64_t s = static_cast<uint64_t>(seed);
  switch (code) {
    case kF32: dropout_mask_kernel<<<blocks, kThreads, 0, stream>>>(out.data_ptr<float>(), n, s, threshold, static_cast<float>(scale)); break;
    case kF64: dropout_mask_kernel<<<blocks, kThreads, 0, stream>>>(out.data_ptr<double>(), n, s, threshold, scale); break;
    case kBF16:
      dropout_mask_kernel<<<blocks, kThreads, 0, stream>>>(out.data_ptr<c10::BFloat16>(), n, s, threshold,
                                                           c10::BFloat16(static_cast<float>(scale)));
      break;
    default:
      dropout_mask_kernel<<<blocks, kThreads, 0, stream>>>(out.data_ptr<c10::Half>(), n, s, threshold,
                                                           c10::Half(static_cast<float>(scale)));
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& t, int64_t rank, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_bwd_generic(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed, output_mask);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        int64_t rank, double scaling, double dropout_p,
                                                        int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_fwd_generic(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed);
}
}  // namespace

}  // namespace lorambo

TORCH_LIBRARY_IMPL(lorambo, CUDA, m) {
  m.impl("multi_dot", &lorambo::multi_dot_cuda);
  m.impl("multi_sq_norm", &lorambo::multi_sq_norm_cuda);
  m.impl("probe_fill_", &lorambo::probe_fill_cuda);
  m.impl("pool_remap_", &lorambo::pool_remap_cuda);
  m.impl("pool_adamw_", &lorambo::pool_adamw_cuda);
  m.impl("dropout_mask", &lorambo::dropout_mask_cuda);
  m.impl("lora_linear_fwd", &lorambo::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd", &lorambo::lora_linear_bwd_cuda);
}
