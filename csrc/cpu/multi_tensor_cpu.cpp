// CPU multi-tensor ops: reductions, Philox probe fill, pool maintenance, dropout masks.
//
// Each op plans work items over the whole list (csrc/plan.cpp), then runs one at::parallel_for
// over groups of items of about equal element counts. Results do not depend on the thread
// count: every item writes its own partial, and partials are combined in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "lorambo/cpu_parallel.h"
#include "lorambo/cpu_simd.h"
#include "lorambo/ops.h"
#include "lorambo/philox.h"
#include "lorambo/plan.h"

namespace lorambo {
namespace {

// 16 independent lanes: vectorisable without reassociation (-O3, no fast-math needed). Each lane
// adds kBlock products in the accumulation type A (float32 unless an operand is float64), then
// hands its block sum to a float64 lane. A float32 lane over the whole chunk (1024 products)
// rounded every add relative to a growing total: a sum of squares (all of one sign) of 4M bf16
// values came out 1.4e-6 off float64, about u32 * sqrt(1024 / 3). With blocks the float32 error
// is that of 8-term sums: |error| <= (7 u32 + u_p) * sum |x y| + float64 terms, u_p the rounding
// of a float32 product (0 for bf16/fp16 operands, whose products are exact in float32).
template <typename A, typename TX, typename TY>
LORAMBO_CLONES double dot_kernel(const TX* x, const TY* y, int64_t n) {
  constexpr int kLanes = 16, kBlock = 8;
  double wide[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes * kBlock <= n; i += kLanes * kBlock) {
    A acc[kLanes] = {};
    for (int b = 0; b < kBlock; ++b) {
      const int64_t k = i + b * kLanes;
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<A>(widen(x[k + j])) * static_cast<A>(widen(y[k + j]));
    }
    for (int j = 0; j < kLanes; ++j) wide[j] += static_cast<double>(acc[j]);
  }
  {  // the last, partial block: fewer than kBlock rows of kLanes
    A acc[kLanes] = {};
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<A>(widen(x[i + j])) * static_cast<A>(widen(y[i + j]));
    }
    for (int j = 0; j < kLanes; ++j) wide[j] += static_cast<double>(acc[j]);
  }
  double sum = 0.0;  // fewer than kLanes products, each rounded to A once
  for (; i < n; ++i) sum += static_cast<double>(static_cast<A>(widen(x[i])) * static_cast<A>(widen(y[i])));
  for (int j = 0; j < kLanes; ++j) sum += wide[j];
  return sum;
}

template <typename Fn>
void with_type(int32_t code, Fn fn) {
  switch (code) {
    case kF32: fn(float{}); break;
    case kF64: fn(double{}); break;
    case kBF16: fn(c10::BFloat16{}); break;
    default: fn(c10::Half{}); break;
  }
}

// float16 operands are widened through a float buffer in blocks (see half_to_float).
template <typename T>
struct Staged {
  static const T* get(const T* p, int64_t, float*) { return p; }
  using type = T;
};
template <>
struct Staged<c10::Half> {
  static const float* get(const c10::Half* p, int64_t n, float* buf) {
    half_to_float(p, buf, n);
    return buf;
  }
  using type = float;
};

template <typename TX, typename TY>
double dot_staged(const TX* x, const TY* y, int64_t n, bool same) {
  constexpr bool wide = std::is_same<TX, double>::value || std::is_same<TY, double>::value;
  using A = typename std::conditional<wide, double, float>::type;
  if constexpr (!std::is_same<TX, c10::Half>::value && !std::is_same<TY, c10::Half>::value) {
    return dot_kernel<A>(x, y, n);
  } else {
    constexpr int64_t kBlock = 2048;
    float bx[kBlock], by[kBlock];
    double sum = 0.0;
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t len = std::min(kBlock, n - s);
      const auto* px = Staged<TX>::get(x + s, len, bx);
      const auto* py = same ? reinterpret_cast<const typename Staged<TY>::type*>(px) : Staged<TY>::get(y + s, len, by);
      sum += dot_kernel<A>(px, py, len);
    }
    return sum;
  }
}

double reduce_item(const ReducePlan& plan, const ReduceItem& it, bool pairs) {
  double out = 0.0;
  const int32_t cx = plan.dtx[it.tensor];
  const int32_t cy = pairs ? plan.dty[it.tensor] : cx;
  with_type(cx, [&](auto tx) {
    using TX = decltype(tx);
    const TX* x = plan.xs[it.tensor].template const_data_ptr<TX>() + it.start;
    if (!pairs) {
      out = dot_staged(x, x, it.len, true);
      return;
    }
    with_type(cy, [&](auto ty) {
      using TY = decltype(ty);
      out = dot_staged(x, plan.ys[it.tensor].template const_data_ptr<TY>() + it.start, it.len, false);
    });
  });
  return out;
}

at::Tensor run_reduce(const ReducePlan& plan, bool pairs) {
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  std::vector<double> partial(n_items, 0.0);
  parallel_items(
      n_items, [&](int64_t i) { return plan.items[i].len; },
      [&](int64_t i) { partial[i] = reduce_item(plan, plan.items[i], pairs); });
  at::Tensor out = at::zeros({plan.rows, plan.count}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k + 1 < static_cast<int64_t>(plan.out_begin.size()); ++k) {
    double s = 0.0;
    for (int64_t i = plan.out_begin[k]; i < plan.out_begin[k + 1]; ++i) s += partial[i];
    o[k] = s;
  }
  return out;
}

// ------------------------------------------------------------------------------ Philox
// Values of positions [q0, q1) from their stream words (see philox.h for the maps);
// out[j] is position q0 + j, words[q - 4 * g0] the word of position q.
template <typename T>
LORAMBO_CLONES void map_words(T* out, const uint32_t* words, uint64_t q0, uint64_t q1, uint64_t g0, int32_t dist) {
  const uint32_t* w = words - 4 * g0;  // w[q] is the word of position q
  const int64_t n = static_cast<int64_t>(q1 - q0);
  if (dist == philox::kRademacher) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>((w[q0 + j] >> 31) ? -1.0f : 1.0f);
  } else if (dist == philox::kUniform) {
    if constexpr (std::is_same<T, double>::value) {
      for (int64_t j = 0; j < n; ++j) out[j] = philox::uniform_f64(w[q0 + j]);
    } else if constexpr (std::is_same<T, c10::BFloat16>::value) {  // keep the bits the dtype holds:
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(w[q0 + j] >> 24) * 0.00390625f);
    } else if constexpr (std::is_same<T, c10::Half>::value) {  // values stay below 1 exactly
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(w[q0 + j] >> 21) * 0.00048828125f);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(philox::uniform_f32(w[q0 + j]));
    }
  } else {  // one log, sqrt and sin/cos pair per Box-Muller pair (philox::gaussian, shared)
    auto store = [&](uint64_t q, double v) {
      if constexpr (std::is_same<T, double>::value) {
        out[q - q0] = v;
      } else {
        out[q - q0] = static_cast<T>(static_cast<float>(v));
      }
    };
    for (uint64_t q = q0; q < q1;) {
      const uint64_t even = q & ~uint64_t{1};
      const double u1 = (static_cast<double>(w[even]) + 0.5) * 2.3283064365386963e-10;
      const double angle = 6.283185307179586 * (static_cast<double>(w[even + 1]) * 2.3283064365386963e-10);
      const double r = std::sqrt(-2.0 * std::log(u1));
      double sn, cs;
#if defined(__GLIBC__)
      ::sincos(angle, &sn, &cs);
#else
      sn = std::sin(angle);
      cs = std::cos(angle);
#endif
      if (q == even) store(q++, r * cs);
      if (q < q1) store(q++, r * sn);
    }
  }
}

template <typename T>
void fill_range(T* out, int64_t len, uint64_t pos, uint64_t seed, int32_t dist, uint32_t domain) {
  philox::for_stream_chunks(seed, pos, len, domain, [&](uint64_t q0, uint64_t q1, const uint32_t* words) {
    map_words<T>(out + (q0 - pos), words, q0, q1, q0 >> 2, dist);
  });
}

template <typename T>
LORAMBO_CLONES void keep_words(T* out, const uint32_t* words, int64_t n, uint32_t threshold_lo, bool all_dropped,
                               T keep) {
  for (int64_t j = 0; j < n; ++j) out[j] = (!all_dropped && words[j] >= threshold_lo) ? keep : static_cast<T>(0);
}

// Remap one item: stage every changed slot's values, then write them (safe in place).
template <typename W>
void remap_item(W* data, const RemapTensor& rt, const RemapItem& it) {
  const int64_t n = static_cast<int64_t>(rt.dst.size());
  const int64_t g = it.o1 - it.o0, w = it.k1 - it.k0;
  std::vector<W> buf(static_cast<size_t>(n * g * w));
  W* b = buf.data();
  if (rt.inner == 1) {  // slots are single elements of each row (lora_B [N, cap]): no memcpy calls
    for (int64_t o = it.o0; o < it.o1; ++o) {
      W* row = data + o * rt.cap;
      for (int64_t t = 0; t < n; ++t) b[t] = rt.src[t] < 0 ? W(0) : row[rt.src[t]];
      for (int64_t t = 0; t < n; ++t) row[rt.dst[t]] = b[t];
    }
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = rt.src[t];
    for (int64_t o = it.o0; o < it.o1; ++o) {
      if (s < 0) {
        std::memset(b, 0, sizeof(W) * w);
      } else {
        std::memcpy(b, data + (o * rt.cap + s) * rt.inner + it.k0, sizeof(W) * w);
      }
      b += w;
    }
  }
  b = buf.data();
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t o = it.o0; o < it.o1; ++o) {
      std::memcpy(data + (o * rt.cap + rt.dst[t]) * rt.inner + it.k0, b, sizeof(W) * w);
      b += w;
    }
  }
}

}  // namespace

at::Tensor multi_dot_cpu(at::TensorList xs, at::TensorList ys, int64_t rows) {
  const ReducePlan plan = plan_reduce("lorambo::multi_dot", xs, ys, true, rows, kReduceChunk);
  return run_reduce(plan, true);
}

at::Tensor multi_sq_norm_cpu(at::TensorList xs, int64_t rows) {
  const ReducePlan plan = plan_reduce("lorambo::multi_sq_norm", xs, {}, false, rows, kReduceChunk);
  return run_reduce(plan, false);
}

void probe_fill_cpu(at::TensorList tensors, int64_t seed, at::IntArrayRef offsets, c10::string_view distribution) {
  FillPlan plan = plan_fill("lorambo::probe_fill_", tensors, seed, offsets, distribution, kFillChunk);
  parallel_items(
      static_cast<int64_t>(plan.items.size()), [&](int64_t i) { return plan.items[i].len; },
      [&](int64_t i) {
        const FillItem& it = plan.items[i];
        with_type(plan.dt[it.tensor], [&](auto tag) {
          using T = decltype(tag);
          fill_range<T>(plan.targets[it.tensor].template data_ptr<T>() + it.start, it.len,
                        static_cast<uint64_t>(it.pos), plan.seed, plan.distribution, philox::kDomainProbe);
        });
      });
  finish_fill(plan, tensors);
}

void pool_remap_cpu(at::TensorList tensors, at::IntArrayRef slot_dims, at::TensorList maps) {
  const RemapPlan plan = plan_remap("lorambo::pool_remap_", tensors, slot_dims, maps, kRemapBufferCpu);
  parallel_items(
      static_cast<int64_t>(plan.items.size()),
      [&](int64_t i) {
        const RemapItem& it = plan.items[i];
        return static_cast<int64_t>(plan.tensors[it.tensor].dst.size()) * (it.o1 - it.o0) * (it.k1 - it.k0);
      },
      [&](int64_t i) {
        const RemapItem& it = plan.items[i];
        const RemapTensor& rt = plan.tensors[it.tensor];
        void* data = tensors[it.tensor].data_ptr();
        switch (rt.elsize) {
          case 2: remap_item(static_cast<uint16_t*>(data), rt, it); break;
          case 4: remap_item(static_cast<uint32_t*>(data), rt, it); break;
          default: remap_item(static_cast<uint64_t*>(data), rt, it); break;
        }
      });
}

// Inverted-dropout multiplier (0 or 1/(1-p)) for every element of x, position = flat index.
at::Tensor dropout_mask_cpu(const at::Tensor& x, double p, int64_t seed) {
  const int32_t code = check_dropout_mask("lorambo::dropout_mask", x, p, seed);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (p == 0.0) return out.fill_(1);
  const uint64_t threshold = philox::dropout_threshold(p);
  const double scale = 1.0 / (1.0 - p);
  const int64_t n = out.numel();
  const int64_t n_items = (n + kFillChunk - 1) / kFillChunk;
  with_type(code, [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data_ptr<T>();
    const T keep = static_cast<T>(scale);
    parallel_items(
        n_items, [&](int64_t) { return kFillChunk; },
        [&](int64_t i) {
          const int64_t s = i * kFillChunk, e = std::min(n, s + kFillChunk);
          philox::for_stream_chunks(static_cast<uint64_t>(seed), static_cast<uint64_t>(s), e - s,
                                    philox::kDomainDropout, [&](uint64_t q0, uint64_t q1, const uint32_t* words) {
                                      keep_words<T>(o + q0, words + (q0 & 3u), static_cast<int64_t>(q1 - q0),
                                                    static_cast<uint32_t>(threshold), threshold >> 32, keep);
                                    });
        });
  });
  return out;
}

}  // namespace lorambo
