// LoRA linear forward/backward on the CPU, and the device-generic (ATen GEMM) path used on CUDA.
//
//   y  = x W^T + b + s * t B_r^T,     t = drop(x) A_r^T                 (M, r)
//   t' = dY B_r                                                        (M, r)
//   dX = dY W + s * (t' A_r) * mask   dA_r = s t'^T drop(x)   dB_r = s dY^T t
//   dW = dY^T x,  db = sum_m dY       (only when asked for)
//
// CPU schedule. The frozen GEMMs (x W^T, dY W, dY^T x) are single multi-threaded BLAS calls:
// BLAS packs W once per call, so splitting them into row tiles would re-pack W (K x N) per
// tile. The rank-r part runs parallel over M: one contiguous block of rows per thread, walked
// in tiles, with single-threaded GEMMs inside. Per tile the dropout mask is regenerated from
// Philox (never stored), the LoRA terms are added into y / dX in place, and dA / dB accumulate
// into one partial per thread block, summed in a fixed order. No [M, N] tensor is created
// besides y (forward) and no [M, K] tensor besides dX (backward); t is [M, r].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "lorambo/cpu_simd.h"
#include "lorambo/ops.h"
#include "lorambo/philox.h"
#include "lorambo/plan.h"

namespace lorambo {

void check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     int64_t rank, double scaling, double dropout_p, int64_t seed) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", shape_str(weight.sizes()));
  // either may be the wrong one: name x, the operand whose shape a caller builds per call, and both shapes
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has last dim ", x.size(1), " (shape ", shape_str(x.sizes()),
              ") but weight is ", shape_str(weight.sizes()), " = [N, K]; x's last dim must be K");
  const int64_t n = weight.size(0), k = x.size(1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == k, op, ": lora_A must be [capacity, K] with K = ", k,
              ", got shape ", shape_str(lora_A.sizes()));
  const int64_t cap = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == n && lora_B.size(1) == cap, op,
              ": lora_B must be [N, capacity] = [", n, ", ", cap, "], got shape ", shape_str(lora_B.sizes()));
  TORCH_CHECK(rank >= 0 && rank <= cap, op, ": rank ", rank, " is outside [0, capacity = ", cap, "]");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [N] = [", n, "], got shape ",
                shape_str(bias->sizes()));
  }
  dtype_code(op, "x", x.scalar_type());
  const char* names[] = {"weight", "bias", "lora_A", "lora_B"};
  const at::Tensor* ts[] = {&weight, bias.has_value() ? &*bias : nullptr, &lora_A, &lora_B};
  for (int i = 0; i < 4; ++i) {
    if (ts[i] == nullptr || !ts[i]->defined()) continue;
    TORCH_CHECK(ts[i]->scalar_type() == x.scalar_type(), op, ": ", names[i], " has dtype ", ts[i]->scalar_type(),
                " but x has dtype ", x.scalar_type(), "; all operands must share one dtype");
    TORCH_CHECK(ts[i]->device() == x.device(), op, ": ", names[i], " is on ", ts[i]->device(), " but x is on ",
                x.device());
  }
  // a nan or inf scaling would turn every output element the LoRA term touches into nan
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  check_dropout(op, dropout_p, seed);
}

void check_lora_bwd_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& t, int64_t rank,
                         double scaling, double dropout_p, int64_t seed, bool need_lora_B) {
  check_lora_args(op, x, weight, std::nullopt, lora_A, lora_B, rank, scaling, dropout_p, seed);
  const int64_t m = x.size(0), n = weight.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == m && grad_y.size(1) == n, op, ": grad_y must be [M, N] = [", m,
              ", ", n, "], got shape ", shape_str(grad_y.sizes()));
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ", grad_y.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(), " but x is on ", x.device());
  if (!need_lora_B || rank == 0) return;  // only dB reads t
  TORCH_CHECK(t.dim() == 2 && t.size(0) == m && t.size(1) == rank, op, ": t must be [M, rank] = [", m, ", ", rank,
              "], got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": t has dtype ", t.scalar_type(), " but x has dtype ",
              x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": t is on ", t.device(), " but x is on ", x.device());
}

namespace {

const at::Tensor& none_if_undefined(const std::optional<at::Tensor>& b, const at::Tensor& empty) {
  return b.has_value() && b->defined() ? *b : empty;
}

// Rows per tile of the rank-r part. Every GEMM call packs its small operand (A_r: r x K or
// B_r: N x r) once, which costs r/rows of the tile's own traffic: at rows = 32 and r = 64 the
// packing moved twice the bytes of the x tile (L2-sized tiles measured slower than whole-matrix
// BLAS). Tiles of max(256, 8 r) rows keep packing at <= 1/8 of the traffic; the tile also bounds
// the dropout staging buffer (tile x K per thread).
int64_t tile_rows(int64_t rank) { return std::max<int64_t>(256, 8 * rank); }

// Contiguous row blocks, one per thread (at least 32 rows each). The whole rank-r part is then
// one parallel region instead of one per BLAS call: on a busy machine every OpenMP region can
// stall on a descheduled thread (measured: 24 ms for a 10x12 @ 12x4 product on the
// 2-core development box), so fewer regions matter more than the last percent of GEMM speed.
int64_t num_blocks(int64_t m) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / 32));
}

template <typename Fn>
void for_row_tiles(int64_t m, int64_t tile, int64_t blocks, Fn fn) {
  auto run_block = [&](int64_t b) {
    const int64_t lo = m * b / blocks, hi = m * (b + 1) / blocks;
    for (int64_t r0 = lo; r0 < hi; r0 += tile) fn(b, r0, std::min(tile, hi - r0));
  };
  if (blocks == 1) {
    run_block(0);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) run_block(b);
  });
}

template <typename Fn>
void with_float_type(at::ScalarType t, Fn fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: fn(c10::Half{}); break;
  }
}

template <typename T>
using opmath = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// out[i, k] = x[i, k] * mask(row0 + i, k)  for a [rows, K] tile at global row row0.
// Mask semantics are those of dropout_mask (positions = flat index in the [M, K] input).
template <typename T>
LORAMBO_CLONES void drop_chunk(const T* x, T* out, const uint32_t* words, int64_t n, uint64_t threshold, T keep) {
  for (int64_t j = 0; j < n; ++j) out[j] = words[j] >= threshold ? static_cast<T>(x[j] * keep) : static_cast<T>(0);
}

template <typename T>
void dropout_rows(const T* x, T* out, int64_t row0, int64_t rows, int64_t k, uint64_t seed, uint64_t threshold,
                  T keep) {
  const uint64_t first = static_cast<uint64_t>(row0) * static_cast<uint64_t>(k);
  philox::for_stream_chunks(seed, first, rows * k, philox::kDomainDropout,
                            [&](uint64_t q0, uint64_t q1, const uint32_t* words) {
                              drop_chunk<T>(x + (q0 - first), out + (q0 - first), words + (q0 & 3u),
                                            static_cast<int64_t>(q1 - q0), threshold, keep);
                            });
}

// dx[i, k] += s * tmp[i, k] * mask(row0 + i, k)
template <typename T>
LORAMBO_CLONES void axpy_chunk(T* dx, const T* tmp, const uint32_t* words, int64_t n, uint64_t threshold,
                               opmath<T> s_keep) {
  for (int64_t j = 0; j < n; ++j) {
    if (words[j] >= threshold) dx[j] = static_cast<T>(static_cast<opmath<T>>(dx[j]) + s_keep * static_cast<opmath<T>>(tmp[j]));
  }
}

template <typename T>
void masked_axpy_rows(T* dx, const T* tmp, int64_t row0, int64_t rows, int64_t k, uint64_t seed,
                      uint64_t threshold, opmath<T> s_keep) {
  const uint64_t first = static_cast<uint64_t>(row0) * static_cast<uint64_t>(k);
  philox::for_stream_chunks(seed, first, rows * k, philox::kDomainDropout,
                            [&](uint64_t q0, uint64_t q1, const uint32_t* words) {
                              axpy_chunk<T>(dx + (q0 - first), tmp + (q0 - first), words + (q0 & 3u),
                                            static_cast<int64_t>(q1 - q0), threshold, s_keep);
                            });
}

struct Dropout {
  bool on;
  uint64_t seed, threshold;
  double scale;
};

// The tile of drop(x) for rows [r0, r0 + rows): x itself without dropout, else `buf`.
at::Tensor dropped_tile(const at::Tensor& x, int64_t r0, int64_t rows, const Dropout& d, at::Tensor& buf) {
  at::Tensor xt = x.narrow(0, r0, rows);
  if (!d.on) return xt;
  const int64_t k = x.size(1);
  if (!buf.defined() || buf.size(0) < rows) buf = at::empty({rows, k}, x.options());
  at::Tensor out = buf.narrow(0, 0, rows);
  with_float_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dropout_rows<T>(xt.const_data_ptr<T>(), out.data_ptr<T>(), r0, rows, k, d.seed, d.threshold,
                    static_cast<T>(d.scale));
  });
  return out;
}

Dropout make_dropout(double p, int64_t seed) {
  return {p > 0.0, static_cast<uint64_t>(std::max<int64_t>(seed, 0)), philox::dropout_threshold(p),
          p > 0.0 ? 1.0 / (1.0 - p) : 1.0};
}

at::Tensor pad_rows(const at::Tensor& active, int64_t capacity) {
  if (active.size(0) == capacity) return active;
  at::Tensor out = at::zeros({capacity, active.size(1)}, active.options());
  out.narrow(0, 0, active.size(0)).copy_(active);
  return out;
}

at::Tensor pad_cols(const at::Tensor& active, int64_t capacity) {
  if (active.size(1) == capacity) return active;
  at::Tensor out = at::zeros({active.size(0), capacity}, active.options());
  out.narrow(1, 0, active.size(1)).copy_(active);
  return out;
}

at::Tensor empty_like_none(const at::Tensor& ref) { return at::empty({0}, ref.options()); }

}  // namespace

// Kernels work on detached aliases: at::parallel_for's worker threads do not inherit the
// caller's dispatch-key exclusions, so an out= GEMM on a tensor that requires grad would hit
// autograd there ("functions with out=... arguments don't support automatic differentiation").
// Every entry point also switches autocast off on the calling thread: its GEMMs run in the
// operands' dtype. A backward called inside an autocast region (after a float32 forward outside
// it) otherwise got bfloat16 products from at::mm next to float32 buffers ("self and mat2 must
// have the same dtype").
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x_arg, const at::Tensor& weight_arg,
                                                       const std::optional<at::Tensor>& bias_arg,
                                                       const at::Tensor& lora_A_arg, const at::Tensor& lora_B_arg,
                                                       int64_t rank, double scaling, double dropout_p,
                                                       int64_t seed) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see above
  check_lora_args("lorambo::lora_linear_fwd", x_arg, weight_arg, bias_arg, lora_A_arg, lora_B_arg, rank, scaling,
                  dropout_p, seed);
  TORCH_CHECK(x_arg.device().is_cpu(), "lorambo::lora_linear_fwd (CPU): x is on ", x_arg.device());
  const at::Tensor x = x_arg.detach().contiguous();
  const at::Tensor weight = weight_arg.detach(), lora_A = lora_A_arg.detach(), lora_B = lora_B_arg.detach();
  std::optional<at::Tensor> bias;
  if (bias_arg.has_value() && bias_arg->defined()) bias = bias_arg->detach();
  const int64_t m = x.size(0), n = weight.size(0), r = rank;
  const at::Tensor empty;
  at::Tensor y = at::empty({m, n}, x.options());
  const at::Tensor& b = none_if_undefined(bias, empty);
  if (b.defined()) {
    at::addmm_out(y, b, x, weight.t());
  } else {
    at::mm_out(y, x, weight.t());
  }
  at::Tensor t = at::empty({m, r}, x.options());
  if (r == 0 || m == 0) return {y, t};
  const at::Tensor a_t = lora_A.narrow(0, 0, r).t();  // (K, r)
  const at::Tensor b_t = lora_B.narrow(1, 0, r).t();  // (r, N)
  const Dropout d = make_dropout(dropout_p, seed);
  const int64_t blocks = num_blocks(m);
  std::vector<at::Tensor> bufs(blocks);
  for_row_tiles(m, tile_rows(r), blocks, [&](int64_t blk, int64_t r0, int64_t rows) {
    at::Tensor tt = t.narrow(0, r0, rows);
    at::mm_out(tt, dropped_tile(x, r0, rows, d, bufs[blk]), a_t);  // (rows, r)
    y.narrow(0, r0, rows).addmm_(tt, b_t, 1.0, scaling);
  });
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_y_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg, const at::Tensor& lora_A_arg,
    const at::Tensor& lora_B_arg, const at::Tensor& t_arg, int64_t rank, double scaling, double dropout_p,
    int64_t seed, std::array<bool, 5> mask) {
  const char* op = "lorambo::lora_linear_bwd";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see above
  check_lora_bwd_args(op, grad_y_arg, x_arg, weight_arg, lora_A_arg, lora_B_arg, t_arg, rank, scaling, dropout_p,
                      seed, mask[4]);
  const at::Tensor grad_y_in = grad_y_arg.detach(), x_in = x_arg.detach(), weight = weight_arg.detach();
  const at::Tensor lora_A = lora_A_arg.detach(), lora_B = lora_B_arg.detach();
  const at::Tensor t_in = t_arg.defined() ? t_arg.detach() : t_arg;
  TORCH_CHECK(x_in.device().is_cpu(), op, " (CPU): x is on ", x_in.device());
  const int64_t m = x_in.size(0), k = x_in.size(1), n = weight.size(0), r = rank, cap = lora_A.size(0);
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2], need_a = mask[3], need_bb = mask[4];
  const at::Tensor g = grad_y_in.contiguous();
  // Only dW and dA read x's values. Without them x may be the zero-stride stand-in the autograd
  // saves (csrc/ops.cpp: rank 0, LoRA-FA), which contiguous() would expand to [M, K]: not copied.
  const at::Tensor x = need_a || need_w ? x_in.contiguous() : x_in;
  at::Tensor gx = need_x ? at::mm(g, weight) : empty_like_none(x);  // (M, K)
  at::Tensor gw = need_w ? at::mm(g.t(), x) : empty_like_none(x);   // (N, K)
  at::Tensor gb = need_b ? g.sum(0) : empty_like_none(x);           // (N,)
  at::Tensor ga = need_a ? at::empty({cap, k}, x.options()) : empty_like_none(x);
  at::Tensor gbb = need_bb ? at::empty({n, cap}, x.options()) : empty_like_none(x);
  if (need_a) ga.narrow(0, r, cap - r).zero_();  // inactive slots: exact zeros
  if (need_bb) gbb.narrow(1, r, cap - r).zero_();
  if (r == 0 || m == 0 || !(need_x || need_a || need_bb)) {
    if (need_a) ga.zero_();
    if (need_bb) gbb.zero_();
    return {gx, gw, gb, ga, gbb};
  }

  const at::Tensor t = need_bb ? t_in.contiguous() : t_in;
  const at::Tensor a_r = lora_A.narrow(0, 0, r);  // (r, K)
  const at::Tensor b_r = lora_B.narrow(1, 0, r);  // (N, r)
  const Dropout d = make_dropout(dropout_p, seed);
  const int64_t blocks = num_blocks(m);
  const int64_t tile = tile_rows(r);
  // float32/float64: block 0 accumulates s * dA_r / s * dB_r straight into the outputs, block
  // b > 0 into a partial; partials are added in block order (deterministic for a given thread
  // count). The first tile of a block overwrites (beta = 0), so nothing is zero-filled first.
  // bfloat16/float16: every block accumulates its tiles' products in a float32 partial, and the
  // sum is scaled and rounded once, as one whole-M GEMM would be; accumulating in the output dtype
  // rounded once per tile (4x the reference op's error in dA and dB at M = 16384).
  const bool widen = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const at::TensorOptions acc_options = widen ? x.options().dtype(at::kFloat) : x.options();
  const int64_t first_partial = widen ? 0 : 1;
  const at::Tensor ga_r = need_a ? ga.narrow(0, 0, r) : at::Tensor();     // (r, K)
  const at::Tensor gbb_r = need_bb ? gbb.narrow(1, 0, r) : at::Tensor();  // (N, r), row stride cap
  const int64_t partials = blocks - first_partial;
  auto partial = [&](bool needed, at::IntArrayRef shape) {  // widened partials are summed into from zero
    if (!needed || partials == 0) return at::Tensor();
    return widen ? at::zeros(shape, acc_options) : at::empty(shape, acc_options);
  };
  at::Tensor pa = partial(need_a, {partials, r, k});
  at::Tensor pb = partial(need_bb, {partials, n, r});
  auto acc_a = [&](int64_t blk) { return blk < first_partial ? ga_r : pa[blk - first_partial]; };
  auto acc_b = [&](int64_t blk) { return blk < first_partial ? gbb_r : pb[blk - first_partial]; };
  auto accumulate = [&](const at::Tensor& acc, const at::Tensor& lhs, const at::Tensor& rhs, double beta) {
    if (widen) {
      acc.add_(at::mm(lhs, rhs));  // scaled once at the end
    } else {
      acc.addmm_(lhs, rhs, beta, scaling);
    }
  };
  std::vector<at::Tensor> xbufs(blocks), tmpbufs(blocks);
  std::vector<char> started(blocks, 0);
  for_row_tiles(m, tile, blocks, [&](int64_t blk, int64_t r0, int64_t rows) {
    const double beta = started[blk] ? 1.0 : 0.0;
    started[blk] = 1;
    const at::Tensor gt = g.narrow(0, r0, rows);  // (rows, N)
    if (need_x || need_a) {
      const at::Tensor tp = at::mm(gt, b_r);  // (rows, r)
      if (need_x) {
        at::Tensor gxt = gx.narrow(0, r0, rows);
        if (!d.on) {
          gxt.addmm_(tp, a_r, 1.0, scaling);
        } else {
          at::Tensor& tmp = tmpbufs[blk];
          if (!tmp.defined() || tmp.size(0) < rows) tmp = at::empty({rows, k}, x.options());
          at::Tensor tmpt = tmp.narrow(0, 0, rows);
          at::mm_out(tmpt, tp, a_r);  // (rows, K)
          with_float_type(x.scalar_type(), [&](auto tag) {
            using T = decltype(tag);
            masked_axpy_rows<T>(gxt.data_ptr<T>(), tmpt.const_data_ptr<T>(), r0, rows, k, d.seed, d.threshold,
                                static_cast<opmath<T>>(scaling * d.scale));
          });
        }
      }
      if (need_a) accumulate(acc_a(blk), tp.t(), dropped_tile(x, r0, rows, d, xbufs[blk]), beta);  // (r, K)
    }
    if (need_bb) accumulate(acc_b(blk), gt.t(), t.narrow(0, r0, rows), beta);  // (N, r)
  });
  if (widen) {
    for (int64_t blk = 1; blk < blocks; ++blk) {
      if (need_a) pa[0].add_(pa[blk]);
      if (need_bb) pb[0].add_(pb[blk]);
    }
    if (need_a) ga_r.copy_(pa[0].mul_(scaling));
    if (need_bb) gbb_r.copy_(pb[0].mul_(scaling));
  } else {
    for (int64_t blk = 1; blk < blocks; ++blk) {
      if (need_a) ga_r.add_(pa[blk - 1]);
      if (need_bb) gbb_r.add_(pb[blk - 1]);
    }
  }
  return {gx, gw, gb, ga, gbb};
}

// ------------------------------------------------------------------------ generic (CUDA)
// Whole-matrix ATen GEMMs (cuBLAS on CUDA); the dropout mask comes from lorambo::dropout_mask
// on the tensor's device, so CPU and CUDA drop the same elements.
static at::Tensor mask_for(const at::Tensor& x, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorambo::dropout_mask", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(x, p, seed);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_generic(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           int64_t rank, double scaling, double dropout_p,
                                                           int64_t seed) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see above
  check_lora_args("lorambo::lora_linear_fwd", x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed);
  const at::Tensor empty;
  const at::Tensor& b = none_if_undefined(bias, empty);
  at::Tensor y = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());
  if (rank == 0) return {y, at::empty({x.size(0), 0}, x.options())};
  const at::Tensor xd = dropout_p > 0.0 ? x * mask_for(x, dropout_p, seed) : x;
  at::Tensor t = at::mm(xd, lora_A.narrow(0, 0, rank).t());
  y.addmm_(t, lora_B.narrow(1, 0, rank).t(), 1.0, scaling);
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_generic(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& t, int64_t rank, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> mask) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see above
  check_lora_bwd_args("lorambo::lora_linear_bwd", g, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed,
                      mask[4]);
  const int64_t r = rank, cap = lora_A.size(0);
  at::Tensor gx = mask[0] ? at::mm(g, weight) : empty_like_none(x);
  at::Tensor gw = mask[1] ? at::mm(g.t(), x) : empty_like_none(x);
  at::Tensor gb = mask[2] ? g.sum(0) : empty_like_none(x);
  at::Tensor ga = mask[3] ? at::zeros_like(lora_A) : empty_like_none(x);
  at::Tensor gbb = mask[4] ? at::zeros_like(lora_B) : empty_like_none(x);
  if (r == 0) return {gx, gw, gb, ga, gbb};
  const at::Tensor a_r = lora_A.narrow(0, 0, r), b_r = lora_B.narrow(1, 0, r);
  at::Tensor drop = dropout_p > 0.0 && (mask[0] || mask[3]) ? mask_for(x, dropout_p, seed) : at::Tensor();
  if (mask[0] || mask[3]) {
    const at::Tensor tp = at::mm(g, b_r);
    if (mask[0]) {
      if (drop.defined()) {
        gx.add_(at::mm(tp, a_r).mul_(drop), scaling);
      } else {
        gx.addmm_(tp, a_r, 1.0, scaling);
      }
    }
    if (mask[3]) ga = pad_rows(at::mm(tp.t(), drop.defined() ? x * drop : x).mul_(scaling), cap);
  }
  if (mask[4]) gbb = pad_cols(at::mm(g.t(), t).mul_(scaling), cap);
  return {gx, gw, gb, ga, gbb};
}

}  // namespace lorambo
