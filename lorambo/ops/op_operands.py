"""The operands every LoRA op takes, checked before anything is computed: one device, and

    x [..., K], weight [N, K], bias [N] or None, lora_A [capacity, K], lora_B [N, capacity]

and its scalars: an int rank in [0, capacity], a finite real scaling, a real dropout_p in [0, 1).

Every backend runs them, because some mismatches would otherwise compute: a lora_B wider than
lora_A's capacity, or a [1, N] bias, broadcast in the reference op's products; a meta operand beside
CPU ones sends the products to their fake implementations, which return uninitialised memory.
"""

from __future__ import annotations

import math
import numbers

import torch

from lorambo.ops.seed_argument import check_seed

__all__ = ["check_backward_call", "check_devices", "check_dropout_p", "check_dtypes", "check_forward_call",
           "check_multiplier_call", "check_operands", "check_rank", "check_scalars", "check_scaling",
           "check_seed_tensor", "check_shapes", "check_tensors"]


def check_operands(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """:func:`check_tensors`, :func:`check_devices`, :func:`check_dtypes` and :func:`check_shapes`."""
    check_tensors(op, x, weight, bias, lora_A, lora_B)
    check_devices(op, x, weight, bias, lora_A, lora_B)
    check_dtypes(op, x, weight, bias, lora_A, lora_B)
    check_shapes(op, x, weight, bias, lora_A, lora_B)


def check_dtypes(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """Raise a TypeError naming ``op`` and the dtypes unless all operands share one (the layers
    cast them to one, autocast's included, before calling an op)."""
    dtypes = _of_each_operand("dtype", x, weight, bias, lora_A, lora_B)
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{op}: all tensors must share one dtype, got {dtypes}")


def check_tensors(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """Raise a TypeError naming ``op`` and the operand unless each is a tensor (bias: or None)."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) and not (name == "bias" and value is None):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_devices(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """Raise a ValueError naming ``op`` and the devices unless all operands are on one device."""
    devices = _of_each_operand("device", x, weight, bias, lora_A, lora_B)
    if len(set(devices.values())) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")


def _of_each_operand(attribute: str, x, weight, bias, lora_A, lora_B) -> dict:
    """{operand name: its ``attribute``}, the bias left out when there is none."""
    operands = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    return {name: getattr(t, attribute) for name, t in operands.items() if t is not None}


def check_shapes(op: str, x, weight, bias, lora_A, lora_B) -> None:
    """Raise a ValueError naming ``op`` and the shapes unless they fit the op's contract.

    Skipped while ``torch.jit.trace`` records: sizes are traced values there and each comparison
    would warn (TracerWarning) in every trace of a model; a mismatch then fails in the op itself,
    with the product's or the extension's own error."""
    if torch.jit.is_tracing():
        return
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in_features]")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{op}: weight, lora_A, lora_B must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n, k = weight.shape
    cap = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has last dim {x.shape[-1]} (shape {tuple(x.shape)}), "
                         f"weight is {tuple(weight.shape)} = [out, in]")
    if lora_A.shape[1] != k:
        raise ValueError(f"{op}: lora_A is {tuple(lora_A.shape)}, expected [capacity, {k}]")
    if tuple(lora_B.shape) != (n, cap):
        raise ValueError(f"{op}: lora_B is {tuple(lora_B.shape)}, expected [{n}, {cap}] "
                         f"(out_features, capacity of lora_A)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias is {tuple(bias.shape)}, expected [{n}]")


def check_rank(op: str, rank, capacity: int) -> None:
    """Raise unless ``rank`` is an int (a SymInt under torch.compile) in [0, capacity]: a TypeError
    for a bool or float (True ran as rank 1), a ValueError outside the range (A[:-1] would drop the
    last slot, A[:capacity + 1] clip)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, torch.SymInt, numbers.Integral)):
        raise TypeError(f"{op}: rank must be an int, got {rank!r}")
    if not 0 <= rank <= capacity:
        raise ValueError(f"{op}: rank {rank} outside [0, capacity = {capacity}]")


def check_scalars(op: str, rank, capacity: int, scaling, dropout_p) -> None:
    """:func:`check_rank`, :func:`check_scaling` and :func:`check_dropout_p`."""
    check_rank(op, rank, capacity)
    check_scaling(op, scaling)
    check_dropout_p(op, dropout_p)


def check_scaling(op: str, scaling) -> None:
    """Raise unless ``scaling`` is a finite real number: a TypeError for a tensor, bool or string
    (``float()`` read '2' as 2.0 and synchronised on a CUDA tensor), a ValueError for nan or inf,
    which would turn every output element the LoRA term touches into nan."""
    if isinstance(scaling, (bool, torch.Tensor)) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{op}: scaling must be a real number (a Python float), got {scaling!r}")
    # comparisons rather than math.isfinite, which torch.compile cannot trace on a symbolic float
    if not -math.inf < scaling < math.inf:
        raise ValueError(f"{op}: scaling must be finite, got {scaling!r}")


def check_dropout_p(op: str, dropout_p) -> None:
    """Raise unless ``dropout_p`` is a real number in [0, 1): a TypeError for a tensor, bool or
    string, a ValueError outside the range (p = 1 divides the kept elements by zero)."""
    if isinstance(dropout_p, (bool, torch.Tensor)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{op}: dropout_p must be a real number (a Python float), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p {dropout_p!r} must be in [0, 1)")


def check_forward_call(op: str, x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed, *,
                       fake: bool = False) -> None:
    """The checks of a call of a backend's registered forward op (``torch.ops.<ns>.lora_linear_fwd``,
    reachable by users, and what a compiled graph calls): :func:`check_operands` on the [M, K]
    rows the op takes, :func:`check_scalars`, and the seed (a 0-d int64 CPU tensor holding an
    int in [0, 2**63)) where dropout_p > 0.

    ``fake``: the call of the op's fake implementation (FakeTensorMode, torch.compile's trace, meta
    tensors), whose tensors have no values: the seed's value is not read, only its metadata."""
    if _call_fits(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p):
        if dropout_p > 0.0:
            check_seed_tensor(op, seed, fake)
        return
    check_operands(op, x, weight, bias, lora_A, lora_B)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    check_scalars(op, rank, lora_A.shape[0], scaling, dropout_p)
    if dropout_p > 0.0:
        check_seed_tensor(op, seed, fake)


def check_backward_call(op: str, grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed, *,
                        fake: bool = False) -> None:
    """:func:`check_forward_call` for a call of a backend's registered backward op, and its own
    operands: grad_y [M, N] and t [M, rank] (the forward's saved product), in x's dtype and on
    its device."""
    check_forward_call(op, x, weight, None, lora_A, lora_B, rank, scaling, dropout_p, seed, fake=fake)
    m, n = x.shape[0], weight.shape[0]
    if _backward_operands_fit(grad_y, t, x, m, n, rank):
        return
    for name, value, shape in (("grad_y", grad_y, (m, n)), ("t", t, (m, rank))):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != x.dtype or value.device != x.device:
            raise TypeError(f"{op}: {name} is {value.dtype} on {value.device}, x is {x.dtype} on {x.device}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{op}: {name} is {tuple(value.shape)}, expected {list(shape)}")


def check_multiplier_call(op: str, x, dropout_p, seed, *, fake: bool = False) -> None:
    """The checks of a call of a backend's registered dropout-multiplier op: a real dropout_p in
    [0, 1) and, where it is above 0, the seed (as :func:`check_forward_call`, ``fake`` too)."""
    check_dropout_p(op, dropout_p)
    if dropout_p > 0.0:
        check_seed_tensor(op, seed, fake)


def check_seed_tensor(op: str, seed, fake: bool = False) -> None:
    """The seed a registered op takes: a 0-d int64 CPU tensor whose value is an int in [0, 2**63);
    the value of a fake is not read (it has none: the op checks it when it runs). The first test
    reads only a real CPU tensor's: a FakeTensor is of a subclass, a meta tensor on no CPU."""
    if (type(seed) is torch.Tensor and seed.dtype is torch.int64 and seed.dim() == 0
            and seed.device.type == "cpu" and int(seed) >= 0):
        return  # the common case, in one test: int64 cannot exceed 2**63 - 1
    check_seed(op, seed)
    if not fake:
        check_seed(op, int(seed))


# Every call of a compiled graph runs the checks above in its ops, so a valid call is recognised
# by one conjunction of cheap tests (measured ~3x cheaper than the checks one by one, on CPU);
# anything it does not accept goes through the checks one by one, which raise with the message.
# Each test here is at least as strict as the check it stands for: a call they accept passes them.

def _call_fits(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p) -> bool:
    """True when the forward checks would pass: plain int rank, Python float scalars, 2-D operands
    of one device and dtype with matching shapes (never while torch.jit.trace records, whose
    size comparisons would warn: the checks skip the shapes there)."""
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and isinstance(lora_A, tensor)
            and isinstance(lora_B, tensor) and (bias is None or isinstance(bias, tensor))):
        return False
    if type(rank) is not int or type(scaling) is not float or type(dropout_p) is not float:
        return False
    if torch.jit.is_tracing():
        return False
    x_shape, w_shape, a_shape, b_shape = x.shape, weight.shape, lora_A.shape, lora_B.shape
    if len(x_shape) != 2 or len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
        return False
    n, k = w_shape
    capacity = a_shape[0]
    if x_shape[1] != k or a_shape[1] != k or b_shape[0] != n or b_shape[1] != capacity:
        return False
    if not (0 <= rank <= capacity and -math.inf < scaling < math.inf and 0.0 <= dropout_p < 1.0):
        return False
    device, dtype = x.device, x.dtype
    if not (weight.device == device and lora_A.device == device and lora_B.device == device
            and weight.dtype == dtype and lora_A.dtype == dtype and lora_B.dtype == dtype):
        return False
    return bias is None or (bias.device == device and bias.dtype == dtype and bias.shape == (n,))


def _backward_operands_fit(grad_y, t, x, m: int, n: int, rank: int) -> bool:
    """True when the backward's own checks would pass: grad_y [m, n] and t [m, rank], tensors
    in x's dtype on x's device."""
    if not (isinstance(grad_y, torch.Tensor) and isinstance(t, torch.Tensor)):
        return False
    device, dtype = x.device, x.dtype
    return (grad_y.device == device and t.device == device and grad_y.dtype == dtype and t.dtype == dtype
            and grad_y.shape == (m, n) and t.shape == (m, rank))
