"""Fake (meta) implementations of the ``torch.ops.lorambo`` ops, for FakeTensor / torch.compile.

``csrc/ops.cpp`` names this module in its ``TORCH_LIBRARY`` block (``set_python_module``), so the
dispatcher imports it on demand; :func:`lorambo.ext.loader.load` also calls
:func:`register_fakes` right after importing ``lorambo._C``. Imported without the extension it
does nothing (an import before ``lorambo._C``, which is then a no-op, registers nothing: hence the
loader's call).
"""

from __future__ import annotations

import math

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true
from torch.library import register_fake

_registered = False


def _one_device(op: str, name: str, tensors, device=None) -> None:
    """The C++ kernels' device check, for the fake path (a meta tensor in a CPU list dispatches
    here, not to the CPU kernel)."""
    ref = device if device is not None else (tensors[0].device if len(tensors) else None)
    for i, t in enumerate(tensors):
        if t.device != ref:
            raise RuntimeError(f"{op}: {name}[{i}] is on {t.device} but the other tensors are on {ref}; "
                               "all tensors must be on one device")


# c10's names of the dtypes whose Python name is not the c10 one capitalised (the kernels' errors
# print c10::ScalarType)
_C10_NAMES = {torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
              torch.int64: "Long", torch.float16: "Half", torch.float32: "Float", torch.float64: "Double",
              torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
              torch.complex128: "ComplexDouble", torch.bfloat16: "BFloat16", torch.qint8: "QInt8",
              torch.quint8: "QUInt8", torch.qint32: "QInt32", torch.quint4x2: "QUInt4x2",
              torch.quint2x4: "QUInt2x4", torch.uint16: "UInt16",
              torch.uint32: "UInt32", torch.uint64: "UInt64"}
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _c10_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype) or str(dtype).removeprefix("torch.").capitalize()


def _dtype(op: str, what: str, dtype: torch.dtype) -> None:
    """csrc/plan.cpp's dtype_code: the dtypes every reduction, mask and LoRA kernel takes."""
    if dtype not in _KERNEL_DTYPES:
        raise RuntimeError(f"{op}: {what} has dtype {_c10_name(dtype)}; supported dtypes are float32, float64, "
                           "bfloat16 and float16")


def _shape(t) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _plan_reduce(op: str, xs, ys, rows: int) -> None:
    """csrc/plan.cpp's plan_reduce checks, in its order (ys None: a norm, no pairs)."""
    if rows < 1:
        raise RuntimeError(f"{op}: rows must be >= 1, got {rows}")
    if ys is not None and len(xs) != len(ys):
        raise RuntimeError(f"{op}: xs has {len(xs)} tensors but ys has {len(ys)}; the lists must pair up")
    _one_device(op, "xs", xs)
    if ys is not None:
        _one_device(op, "ys", ys, xs[0].device if len(xs) else None)
    for i, x in enumerate(xs):
        _dtype(op, f"xs[{i}]", x.dtype)
        if ys is not None:
            _dtype(op, f"ys[{i}]", ys[i].dtype)
            if x.shape != ys[i].shape:
                raise RuntimeError(f"{op}: xs[{i}] has shape {_shape(x)} but ys[{i}] has shape {_shape(ys[i])}; "
                                   "pairs must have equal shapes")
        if rows > 1 and (x.dim() < 1 or x.shape[0] != rows):
            raise RuntimeError(f"{op}: xs[{i}] has shape {_shape(x)} but rows={rows} needs a leading "
                               f"dimension of {rows}")


def _check_dropout(op: str, p: float, seed: int) -> None:
    """csrc/plan.cpp's check_dropout (``:g`` prints p as the C++ stream does)."""
    if not 0.0 <= p < 1.0:
        raise RuntimeError(f"{op}: dropout_p must be in [0, 1), got {p:g}")
    if p > 0.0 and seed < 0:
        raise RuntimeError(f"{op}: seed must be in [0, 2^63), got {seed}")


def check_dropout_mask(op: str, x, p: float, seed: int) -> None:
    """csrc/plan.cpp's check_dropout_mask: the mask of a layer input [..., K]."""
    _check_dropout(op, p, seed)
    _dtype(op, "x", x.dtype)
    if x.dim() < 1:
        raise RuntimeError(f"{op}: x must have at least one dimension [..., K], got a 0-d tensor")


def check_lora_args(op: str, x, weight, bias, lora_A, lora_B, rank: int, scaling: float, dropout_p: float,
                     seed: int) -> None:
    """csrc/cpu/lora_linear_cpu.cpp's check_lora_args, in its order: x [M, K], weight [N, K],
    lora_A [capacity, K], lora_B [N, capacity], rank in [0, capacity], bias [N], one kernel dtype
    and one device, a finite scaling, then dropout_p and the seed."""
    if x.dim() != 2:
        raise RuntimeError(f"{op}: x must be 2-D [M, K], got shape {_shape(x)}")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be 2-D [N, K], got shape {_shape(weight)}")
    n, k = weight.shape[0], x.shape[1]
    if k != weight.shape[1]:
        raise RuntimeError(f"{op}: x has last dim {k} (shape {_shape(x)}) but weight is {_shape(weight)} = "
                           "[N, K]; x's last dim must be K")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise RuntimeError(f"{op}: lora_A must be [capacity, K] with K = {k}, got shape {_shape(lora_A)}")
    cap = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[0] != n or lora_B.shape[1] != cap:
        raise RuntimeError(f"{op}: lora_B must be [N, capacity] = [{n}, {cap}], got shape {_shape(lora_B)}")
    if not 0 <= rank <= cap:
        raise RuntimeError(f"{op}: rank {rank} is outside [0, capacity = {cap}]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise RuntimeError(f"{op}: bias must be [N] = [{n}], got shape {_shape(bias)}")
    _dtype(op, "x", x.dtype)
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise RuntimeError(f"{op}: {name} has dtype {_c10_name(t.dtype)} but x has dtype {_c10_name(x.dtype)}; "
                               "all operands must share one dtype")
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not -math.inf < scaling < math.inf:  # ":g" prints nan and inf as the C++ stream does
        raise RuntimeError(f"{op}: scaling must be finite, got {scaling:g}")
    _check_dropout(op, dropout_p, seed)


def check_lora_bwd_args(op: str, grad_y, x, weight, lora_A, lora_B, t, rank: int, scaling: float,
                         dropout_p: float, seed: int, output_mask) -> None:
    """The backward kernels' checks (check_lora_bwd_args, csrc/cpu/lora_linear_cpu.cpp): check_lora_args,
    grad_y [M, N], and t [M, rank] where dB is asked for at rank > 0, each in x's dtype and on x's device."""
    check_lora_args(op, x, weight, None, lora_A, lora_B, rank, scaling, dropout_p, seed)
    m, n = x.shape[0], weight.shape[0]
    if grad_y.dim() != 2 or grad_y.shape[0] != m or grad_y.shape[1] != n:
        raise RuntimeError(f"{op}: grad_y must be [M, N] = [{m}, {n}], got shape {_shape(grad_y)}")
    _same_dtype_and_device(op, "grad_y", grad_y, x)
    # only dB reads t. A symbolic rank (lorambo_ext's fakes under torch.compile: unbacked, no guard
    # possible) may be above 0: t is then checked, which the t of a [M, rank] forward passes at rank 0 too
    if not output_mask[4] or not guard_or_true(rank > 0):
        return
    if t.dim() != 2 or t.shape[0] != m or t.shape[1] != rank:
        raise RuntimeError(f"{op}: t must be [M, rank] = [{m}, {rank}], got shape {_shape(t)}")
    _same_dtype_and_device(op, "t", t, x)


def _same_dtype_and_device(op: str, name: str, tensor, x) -> None:
    if tensor.dtype != x.dtype:
        raise RuntimeError(f"{op}: {name} has dtype {_c10_name(tensor.dtype)} but x has dtype {_c10_name(x.dtype)}")
    if tensor.device != x.device:
        raise RuntimeError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")


def register_fakes() -> None:
    """Register the fakes once the extension's operators exist (idempotent; no-op before)."""
    global _registered
    if _registered or not hasattr(torch.ops.lorambo, "multi_dot"):
        return
    _registered = True

    @register_fake("lorambo::multi_dot")
    def _multi_dot(xs, ys, rows=1):
        _plan_reduce("lorambo::multi_dot", xs, ys, rows)
        return xs[0].new_empty((rows, len(xs)), dtype=torch.float64)

    @register_fake("lorambo::multi_sq_norm")
    def _multi_sq_norm(xs, rows=1):
        _plan_reduce("lorambo::multi_sq_norm", xs, None, rows)
        return xs[0].new_empty((rows, len(xs)), dtype=torch.float64)

    @register_fake("lorambo::probe_fill_")
    def _probe_fill(tensors, seed, offsets, distribution):
        _one_device("lorambo::probe_fill_", "tensors", tensors)
        return None

    @register_fake("lorambo::pool_remap_")
    def _pool_remap(tensors, slot_dims, maps):
        _one_device("lorambo::pool_remap_", "tensors", tensors)
        for i, m in enumerate(maps):  # the kernels read the maps on the host
            if m.device.type != "cpu" or m.dtype != torch.int64 or m.dim() != 1:
                raise RuntimeError(f"lorambo::pool_remap_: maps[{i}] must be a 1-D int64 CPU tensor")
        return None

    @register_fake("lorambo::pool_adamw_")
    def _pool_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, slot_steps, slot_dims, ranks, lr,
                    beta1, beta2, eps, weight_decay, maximize):
        device = params[0].device if len(params) else None
        for name, tensors in (("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
                              ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs),
                              ("slot_steps", slot_steps)):
            _one_device("lorambo::pool_adamw_", name, tensors, device)
        return None

    @register_fake("lorambo::scalars_add_")
    def _scalars_add(tensors, value):
        _one_device("lorambo::scalars_add_", "tensors", tensors)
        for i, t in enumerate(tensors):  # the CPU kernel's checks (csrc/cpu/scalars_add_cpu.cpp)
            torch._check(t.numel() == 1,
                         lambda: f"lorambo::scalars_add_: tensors[{i}] has {t.numel()} elements; expected one")
            torch._check(t.dtype.is_floating_point or t.dtype.is_complex,
                         lambda: f"lorambo::scalars_add_: tensors[{i}] has dtype {t.dtype}; expected a "
                                 "floating-point or complex count")
        return None

    @register_fake("lorambo::zero_views_")
    def _zero_views(tensors):
        _one_device("lorambo::zero_views_", "tensors", tensors)
        return None

    @register_fake("lorambo::dropout_mask")
    def _dropout_mask(x, p, seed):
        check_dropout_mask("lorambo::dropout_mask", x, p, seed)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @register_fake("lorambo::lora_linear_fwd")
    def _lora_linear_fwd(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
        check_lora_args("lorambo::lora_linear_fwd", x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], rank))

    @register_fake("lorambo::lora_linear_bwd")
    def _lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed, output_mask):
        check_lora_bwd_args("lorambo::lora_linear_bwd", grad_y, x, weight, lora_A, lora_B, t, rank, scaling,
                             dropout_p, seed, output_mask)
        shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
        return tuple(x.new_empty(shape if want else (0,)) for shape, want in zip(shapes, output_mask))


register_fakes()
