"""The LoRA linear op on the fused Triton kernels (``lorambo_kernels``), as torch.library ops.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T      same semantics as lora_linear_reference

Two custom ops (namespace ``lorambo_triton``; ``lorambo::`` belongs to the compiled extension),
each with a fake (meta) implementation, so torch.compile traces a model of
LoRAMBoLinear layers without graph breaks (they are opaque nodes in the graph):

    lorambo_triton::lora_linear_fwd(x2, W, b?, A, B, rank, scaling, p, seed) -> (y [M, N], t [M, r])
    lorambo_triton::lora_linear_bwd(dY, x2, W, A, B, t, rank, scaling, p, seed, needs...) -> 5 grads

``seed`` is a 0-d int64 CPU tensor, not a Python int: under torch.compile a fresh dropout seed
per call is then a ``torch.randint`` node of the graph, where an int would be a graph break
(``.item()``) or a constant baked into the graph (the same mask on every call). Reading a CPU
scalar inside the op is no device synchronisation.

``register_autograd`` connects them: t = drop(x) A_r^T is saved from the forward, dropout masks
are regenerated in the backward from the seed (philox counters, never stored), and only the
gradients autograd asks for are computed. Nothing reads a device value on the host (rank,
scaling, p are Python scalars, seed a CPU scalar), so the op is CUDA-graph capturable; a
captured graph replays the seed it was captured with, i.e. the same dropout mask.

Dropout: the kernels draw their own mask (``lorambo_kernels.dropout_keep_mask``); it is not the
torch-generator mask of the reference op, so the two backends agree exactly only at p = 0.

Double backward (``create_graph=True``, e.g. Hessian-vector products) is not done by kernels.
By design the backward then evaluates the same formulas with differentiable PyTorch ops on the
saved inputs (and the kernels' dropout mask), so HVPs through the triton backend are exact, at
reference-op speed. Plain backward never takes that path.
"""

import math
import numbers
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- availability
def triton_unavailable_reason(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on ``device_type``, else why not (for errors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and device_type == "cpu":
        return None
    return (f"the Triton kernels need a CUDA device (or CPU tensors under TRITON_INTERPRET=1), "
            f"got device type {device_type!r}")


def _kernels():
    import lorambo_kernels.lora_linear as kernels  # imported lazily: triton is optional

    return kernels


# ------------------------------------------------------------------------------ validation
def _check_inputs(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed) -> None:
    """Raise a TypeError/ValueError naming the bad value; runs before any kernel launch."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"lora_linear_triton: {name} must be a torch.Tensor, got {type(value).__name__}")
    from lorambo_kernels.config import SUPPORTED_DTYPES

    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"lora_linear_triton: all tensors must share one dtype, got {dtypes}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear_triton: dtype {x.dtype} is not supported by the Triton kernels "
                        f"(float16, bfloat16, float32); use the 'torch' backend")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"lora_linear_triton: all tensors must be on one device, got {devices}")
    reason = triton_unavailable_reason(x.device.type)
    if reason is not None:
        raise RuntimeError(f"lora_linear_triton: {reason}")
    if x.dim() < 1:
        raise ValueError("lora_linear_triton: x must have at least one dimension [..., in_features]")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_linear_triton: weight, lora_A, lora_B must be 2-D, got shapes "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    n, k = weight.shape
    cap = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"lora_linear_triton: x has last dim {x.shape[-1]} (shape {tuple(x.shape)}), "
                         f"weight is {tuple(weight.shape)} = [out, in]")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_linear_triton: lora_A is {tuple(lora_A.shape)}, expected [capacity, {k}]")
    if tuple(lora_B.shape) != (n, cap):
        raise ValueError(f"lora_linear_triton: lora_B is {tuple(lora_B.shape)}, expected [{n}, {cap}] "
                         f"(out_features, capacity of lora_A)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"lora_linear_triton: bias is {tuple(bias.shape)}, expected [{n}]")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"lora_linear_triton: rank must be an int, got {rank!r}")
    if not 0 <= rank <= cap:
        raise ValueError(f"lora_linear_triton: rank {rank} outside [0, capacity = {cap}]")
    if isinstance(scaling, Tensor) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise TypeError(f"lora_linear_triton: scaling must be a finite Python float, got {scaling!r}")
    if isinstance(dropout_p, Tensor) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear_triton: dropout_p {dropout_p!r} must be a float in [0, 1)")
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("lora_linear_triton: dropout_p > 0 needs an integer seed")
        if isinstance(seed, Tensor):
            if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
                raise ValueError(f"lora_linear_triton: a tensor seed must be a 0-d int64 CPU tensor, got "
                                 f"shape {tuple(seed.shape)}, {seed.dtype} on {seed.device}")
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"lora_linear_triton: seed must be an int in [0, 2**63), got {seed!r}")


# ---------------------------------------------------------------------------- custom ops
def _seed_int(seed: Tensor) -> int:
    return int(seed)  # a CPU scalar: no device synchronisation


def seed_tensor(seed) -> Tensor:
    """``seed`` (int or 0-d int64 CPU tensor) as the 0-d int64 CPU tensor the ops take."""
    return seed if isinstance(seed, Tensor) else torch.tensor(int(seed), dtype=torch.int64)


@torch.library.custom_op("lorambo_triton::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     rank: int, scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (y [M, N], t = drop(x) A_r^T [M, r])."""
    return _kernels().lora_linear_forward(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p,
                                          _seed_int(seed))


@_lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, rank))


@torch.library.custom_op("lorambo_triton::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
                     rank: int, scaling: float, dropout_p: float, seed: Tensor, need_x: bool, need_w: bool,
                     need_b: bool, need_a: bool, need_bb: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, dA, dB); a gradient that was not asked for is an empty [0] tensor."""
    grads = _kernels().lora_linear_backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p,
                                            _seed_int(seed), (need_x, need_w, need_b, need_a, need_bb))
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@_lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed,
                          need_x, need_w, need_b, need_a, need_bb):
    shapes = (x.shape, weight.shape, (weight.shape[0],), lora_A.shape, lora_B.shape)
    needs = (need_x, need_w, need_b, need_a, need_bb)
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed = inputs
    _, t = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, t, seed)
    ctx.rank, ctx.scaling, ctx.dropout_p = rank, scaling, dropout_p
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(t)


def _backward(ctx, grad_y, _grad_t):
    x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    need_b = need_b and ctx.has_bias
    args = (ctx.rank, ctx.scaling, ctx.dropout_p, seed)
    if torch.is_grad_enabled():  # create_graph=True: differentiable formulas (see module doc)
        grads = _differentiable_backward(grad_y, x, weight, lora_A, lora_B, *args,
                                         (need_x, need_w, need_b, need_a, need_bb))
    else:
        out = torch.ops.lorambo_triton.lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, t, *args,
                                                need_x, need_w, need_b, need_a, need_bb)
        grads = tuple(g if need else None for g, need in zip(out, (need_x, need_w, need_b, need_a, need_bb)))
    return (*grads, None, None, None, None)


torch.library.register_autograd("lorambo_triton::lora_linear_fwd", _backward, setup_context=_setup_context)


def _differentiable_backward(grad_y, x, weight, lora_A, lora_B, rank, scaling, dropout_p, seed, needs):
    """The backward formulas with differentiable torch ops, for double backward (exact)."""
    need_x, need_w, need_b, need_a, need_bb = needs
    grad_x = grad_w = grad_b = grad_a = grad_bb = None
    mask = None
    if dropout_p > 0.0 and rank > 0:
        from lorambo_kernels import dropout_keep_mask

        keep = dropout_keep_mask(_seed_int(seed), x.shape[0], x.shape[1], dropout_p, x.device)
        mask = keep.to(x.dtype) / (1.0 - dropout_p)  # (M, K)
    x_drop = x if mask is None else x * mask
    a_r, b_r = lora_A[:rank], lora_B[:, :rank]
    t_prime = grad_y @ b_r  # (M, r)
    if need_x:
        lora_x = (t_prime @ a_r) * scaling
        grad_x = grad_y @ weight + (lora_x if mask is None else lora_x * mask)
    if need_w:
        grad_w = grad_y.t() @ x
    if need_b:
        grad_b = grad_y.sum(0)
    if need_a:
        grad_a = F.pad((t_prime.t() @ x_drop) * scaling, (0, 0, 0, lora_A.shape[0] - rank))
    if need_bb:
        grad_bb = F.pad((grad_y.t() @ (x_drop @ a_r.t())) * scaling, (0, lora_B.shape[1] - rank))
    return grad_x, grad_w, grad_b, grad_a, grad_bb


# -------------------------------------------------------------------------------- public
def lora_linear_triton(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p=0.0, seed=None):
    """LoRA linear on inputs of shape [..., K] with the fused Triton kernels.

    weight [N, K], bias [N] or None, lora_A [cap, K], lora_B [N, cap], 0 <= rank <= cap.
    ``dropout_p > 0`` needs a ``seed``: an int, or a 0-d int64 CPU tensor (what torch.compile
    can carry as a graph value); same seed, same mask. Inputs are checked
    (dtype, device, shapes, rank) before anything is launched.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    p = float(dropout_p)
    y, _ = torch.ops.lorambo_triton.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, int(rank), float(scaling), p,
                                                    seed_tensor(seed if p > 0.0 else 0))
    return y.reshape(*lead, weight.shape[0])
