"""One LoRA linear op per backend as ``torch.library`` custom ops: traceable, with exact double backward.

    y = x W^T + b + s * (drop(x) A_r^T) B_r^T,   A_r = A[:r], B_r = B[:, :r]

:func:`define_lora_op` turns a backend's three plain functions (forward, backward, dropout
multiplier) into three custom ops in the backend's namespace ``ns``, each with a fake (meta)
implementation, and connects them with ``register_autograd``::

    ns::lora_linear_fwd(x2, W, b?, A, B, rank, scaling, p, seed) -> (y [M, N], t [M, r])
    ns::lora_linear_bwd(dY, x2, W, A, B, t, rank, scaling, p, seed, needs x5) -> 5 grads
    ns::dropout_multiplier(x2, p, seed) -> 0 or 1/(1-p), shaped like x2

Why custom ops: ``torch.compile(fullgraph=True)`` sees each one as a single opaque node, so
nothing inside (a ``torch.Generator``, a C++ op, a Triton launch) has to be traceable.

- ``seed`` is a 0-d int64 CPU tensor, not a Python int: under torch.compile a fresh dropout seed
  per call is then a ``torch.randint`` node of the graph, where an int would be a graph break
  (``.item()``) or a constant baked into the graph (the same mask on every call). Reading a CPU
  scalar inside the op is no device synchronisation.
- ``rank`` is a ``SymInt`` in the schema: a compiled model whose rank changes keeps one graph
  with a symbolic rank (t's fake shape is [M, rank]) instead of one graph per rank.
- ``t = drop(x) A_r^T`` is saved from the forward; the dropout mask is regenerated from the seed
  in the backward, never stored; only the gradients autograd asks for are computed, and
  gradients of inactive pool slots are exactly zero. Only dW and dA_r read x's values: with the
  base weight frozen and lora_A frozen (LoRA-FA) or at rank 0, the backward keeps a zero-stride
  stand-in of x's shape instead of x, so such a layer holds what the frozen layer holds besides t.
  Only dB_r reads t: with lora_B frozen the backward keeps a stand-in of t too.
- With ``create_graph=True`` (Hessian-vector products) the backward evaluates the same formulas
  with differentiable torch ops on the saved inputs (mask from the backend's own
  ``dropout_multiplier``), so double backward is exact; plain backward never takes that path.
  Where x is not kept, dB_r = s dY^T t reads the saved t instead of x: t is then a differentiable
  output of the op (its backward, grad_x += (grad_t A_r) * mask, runs only in a double backward),
  so dB_r keeps its dependence on x, the Hessian's cross terms with everything upstream of x.

Outside torch.compile the same three functions run through a ``torch.autograd.Function``
instead: the custom-op dispatch costs more than a small layer's whole forward+backward. Under a
``TorchDispatchMode`` (``FlopCounterMode``, ``FakeTensorMode``, ...) the custom ops run eagerly
too, so the mode sees one op with its fake implementation and FLOP formula
(:mod:`lorambo.ext.flops`) instead of raw kernel launches it cannot see into. So they do under
``torch.jit.trace``: the trace records one op node whose sizes and dropout seed are values of
the trace (it runs at other shapes and draws a fresh mask per call) and which runs the Triton
kernels, launches the tracer cannot record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lorambo.ext.flops import register_lora_flop_formulas
from lorambo.ops.compile_support import autocast_available
from lorambo.ops.op_operands import (check_backward_call, check_forward_call, check_multiplier_call,
                                    check_seed_tensor)

__all__ = ["define_lora_op", "differentiable_backward", "seed_tensor", "seed_value"]


def seed_tensor(seed) -> Tensor:
    """``seed`` (int or 0-d int64 CPU tensor) as the 0-d int64 CPU tensor the ops take."""
    if isinstance(seed, Tensor):
        return seed
    if torch.jit.is_tracing():
        # torch.tensor is a constant of the trace, pooled with equal constants; one made from a
        # Python number in the model (GPT-2's ``+ 0``) runs as an int, which the op refuses
        return torch.full((), int(seed), dtype=torch.int64)
    return torch.tensor(int(seed), dtype=torch.int64)


def seed_value(seed: Tensor) -> int:
    """The seed as a Python int (a CPU scalar: no device synchronisation)."""
    return int(seed)


def differentiable_backward(grad_y, x, weight, lora_A, lora_B, rank, scaling, mask, needs, t=None):
    """The backward formulas with differentiable torch ops (for double backward, exact).

    ``mask``: the dropout multiplier of x (0 or 1/(1-p)), or None without dropout.
    ``t``: the forward's drop(x) A_r^T, as a differentiable output of the op, where x was not
    kept (x is then a stand-in of its shape): dB_r is computed from it instead of from x.
    """
    need_x, need_w, need_b, need_a, need_bb = needs
    grad_x = grad_w = grad_b = grad_a = grad_bb = None
    a_r, b_r = lora_A[:rank], lora_B[:, :rank]
    if need_a or (need_bb and t is None):
        x_drop = x if mask is None else x * mask
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
        t_value = x_drop @ a_r.t() if t is None else t
        grad_bb = F.pad((grad_y.t() @ t_value) * scaling, (0, lora_B.shape[1] - rank))
    return grad_x, grad_w, grad_b, grad_a, grad_bb


def define_lora_op(ns: str, forward: Callable, backward: Callable, multiplier: Callable,
                   eager: Callable | None = None, *, check_backend: Callable | None = None,
                   checked_inside: bool = False, fake_checks: tuple[Callable, Callable, Callable] | None = None
                   ) -> Callable:
    """Register the three ops in namespace ``ns`` and return ``apply(x2, W, b, A, B, rank,
    scaling, p, seed) -> y`` (x2 is [M, K]; seed an int or a 0-d int64 CPU tensor, 0 without
    dropout; autograd-aware, traceable).

    forward(x, W, b, A, B, rank, scaling, p, seed: int) -> (y [M, N], t [M, r])
    backward(dY, x, W, A, B, t, rank, scaling, p, seed: int, needs) -> 5 gradients (None where
        not needed; dA / dB full pool shape with zero inactive slots)
    multiplier(x, p, seed: int) -> the dropout multiplier forward/backward apply to x
    eager(x, W, b, A, B, rank, scaling, p, seed: int) -> y: an autograd-aware op with the same
        semantics to run outside torch.compile (default: an autograd.Function over the three)
    check_backend(op, x) raises unless the backend computes in x's dtype on x's device.
    fake_checks: where ``checked_inside``, what those functions check, for the fakes (which cannot
        call them: their rank may be symbolic): (x, W, b, A, B, rank, scaling, p),
        (dY, x, W, A, B, t, rank, scaling, p, needs) and (x, p), each raising as its function does.

    Users reach the three ops through ``torch.ops.<ns>``, past the public functions' checks, so
    each op checks its operands as those do (:mod:`lorambo.ops.op_operands`; ``check_backend`` for
    the backend's dtypes and devices) before ``forward`` / ``backward`` / ``multiplier`` run, unless
    ``checked_inside`` says those check everything themselves (the extension's C++ ops: they take
    the seed as an int, so the op checks the seed tensor it reads that int from). The
    eager path (``apply`` outside torch.compile) does not call the ops: its operands are checked
    once, by the public function, and a compiled graph's once, by the op.
    """
    fwd_name, bwd_name, multiplier_name = (f"{ns}::{op}" for op in ("lora_linear_fwd", "lora_linear_bwd",
                                                                       "dropout_multiplier"))

    @torch.library.custom_op(fwd_name, mutates_args=())
    def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                        rank: int, scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
        if not checked_inside:
            check_forward_call(fwd_name, x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
            if check_backend is not None:
                check_backend(fwd_name, x)
        elif dropout_p > 0.0:
            check_seed_tensor(fwd_name, seed)
        return forward(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed_value(seed))

    # The fakes check what the ops check, so a bad call fails while torch.compile traces it, with
    # the op's message, not when the graph runs. They read no tensor values (a fake has none): the
    # seed's value is checked when the op runs.
    def fake_backend_check(op, x):
        if check_backend is not None and x.device.type != "meta":  # meta: no device a backend runs on
            check_backend(op, x)

    def fake_seed_check(op, dropout_p, seed):
        if dropout_p > 0.0:
            check_seed_tensor(op, seed, fake=True)

    @lora_linear_fwd.register_fake
    def _fwd_fake(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
        if not checked_inside:
            check_forward_call(fwd_name, x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed, fake=True)
            fake_backend_check(fwd_name, x)
        else:
            fake_seed_check(fwd_name, dropout_p, seed)
            if fake_checks is not None:
                fake_checks[0](x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p)
        m = x.shape[0]
        return x.new_empty((m, weight.shape[0])), x.new_empty((m, rank))

    @torch.library.custom_op(bwd_name, mutates_args=())
    def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, t: Tensor,
                        rank: int, scaling: float, dropout_p: float, seed: Tensor, need_x: bool, need_w: bool,
                        need_b: bool, need_a: bool, need_bb: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(dx, dW, db, dA, dB); a gradient that was not asked for is an empty [0] tensor."""
        if not checked_inside:
            check_backward_call(bwd_name, grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed)
            if check_backend is not None:
                check_backend(bwd_name, x)
        elif dropout_p > 0.0:
            check_seed_tensor(bwd_name, seed)
        # the check in _backward_rule ran while tracing when this op is in a compiled backward graph
        with autocast_off(grad_y.device.type):
            grads = backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed_value(seed),
                             (need_x, need_w, need_b, need_a, need_bb))
        return tuple(g if g is not None else x.new_empty((0,)) for g in grads)

    @lora_linear_bwd.register_fake
    def _bwd_fake(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed,
                  need_x, need_w, need_b, need_a, need_bb):
        needs = (need_x, need_w, need_b, need_a, need_bb)
        if not checked_inside:
            check_backward_call(bwd_name, grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, seed,
                                fake=True)
            fake_backend_check(bwd_name, x)
        else:
            fake_seed_check(bwd_name, dropout_p, seed)
            if fake_checks is not None:
                fake_checks[1](grad_y, x, weight, lora_A, lora_B, t, rank, scaling, dropout_p, needs)
        shapes = (x.shape, weight.shape, (weight.shape[0],), lora_A.shape, lora_B.shape)
        return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs))

    @torch.library.custom_op(multiplier_name, mutates_args=())
    def dropout_multiplier(x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
        if not checked_inside:
            check_multiplier_call(multiplier_name, x, dropout_p, seed)
            if check_backend is not None:
                check_backend(multiplier_name, x)
        elif dropout_p > 0.0:
            check_seed_tensor(multiplier_name, seed)
        return multiplier(x, dropout_p, seed_value(seed))

    @dropout_multiplier.register_fake
    def _multiplier_fake(x, dropout_p, seed):
        if not checked_inside:
            check_multiplier_call(multiplier_name, x, dropout_p, seed, fake=True)
            fake_backend_check(multiplier_name, x)
        else:
            fake_seed_check(multiplier_name, dropout_p, seed)
            if fake_checks is not None:
                fake_checks[2](x, dropout_p)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed = inputs
        ctx.x_kept = keeps_input(weight, lora_A, rank)
        ctx.save_for_backward(x if ctx.x_kept else input_stand_in(x), weight, lora_A, lora_B,
                              t_for_backward(output[1], lora_B.requires_grad), seed)
        _remember(ctx, bias, rank, scaling, dropout_p)
        if ctx.x_kept:
            ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # see _backward_rule

    def backward_rule(ctx, grad_y, grad_t):
        x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
        return _backward_rule(ctx, grad_y, grad_t, (x, weight, lora_A, lora_B, t), ctx.x_kept, seed,
                              lora_linear_bwd, dropout_multiplier)

    lora_linear_fwd.register_autograd(backward_rule, setup_context=setup_context)
    register_lora_flop_formulas(ns)

    def backward_int_seed(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, *needs):
        return backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, needs)

    class EagerFunction(torch.autograd.Function):
        """The same forward/backward outside torch.compile, without the custom-op dispatch
        (measured ~3x slower than this on a small layer's forward+backward on CPU)."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
            y, t = forward(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
            ctx.save_for_backward(x, weight, lora_A, lora_B, t_for_backward(t, ctx.needs_input_grad[4]))
            _remember(ctx, bias, rank, scaling, dropout_p)
            ctx.seed = seed
            return y

        @staticmethod
        def backward(ctx, grad_y):
            return _backward_rule(ctx, grad_y, None, ctx.saved_tensors, True, ctx.seed, backward_int_seed,
                                  multiplier)

    class EagerInputFreeFunction(torch.autograd.Function):
        """:class:`EagerFunction` for a layer whose backward reads only x's shape (see
        :func:`keeps_input`): keeps a stand-in of x, and returns t as a differentiable output
        for the double backward (module doc). The layers with trainable lora_A keep the
        one-output Function: an output more costs each call."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
            y, t = forward(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
            ctx.save_for_backward(input_stand_in(x), weight, lora_A, lora_B,
                                  t_for_backward(t, ctx.needs_input_grad[4]))
            _remember(ctx, bias, rank, scaling, dropout_p)
            ctx.seed = seed
            ctx.set_materialize_grads(False)  # see _backward_rule
            return y, t

        @staticmethod
        def backward(ctx, grad_y, grad_t):
            return _backward_rule(ctx, grad_y, grad_t, ctx.saved_tensors, False, ctx.seed, backward_int_seed,
                                  multiplier)

    def apply(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or torch.jit.is_tracing():
            return lora_linear_fwd(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed_tensor(seed))[0]
        seed = int(seed)  # a CPU scalar when a tensor: no device synchronisation
        if eager is not None:
            return eager(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
        if keeps_input(weight, lora_A, rank):
            return EagerFunction.apply(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)
        return EagerInputFreeFunction.apply(x2, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)[0]

    return apply


def autocast_off(device_type: str):
    """A context that turns autocast off on ``device_type`` if it is on, else a no-op.

    The backward computes in the dtypes of the forward. Under torch.compile the backward rule
    runs once, while AOTAutograd traces the backward graph, so its check sees the autocast state
    of tracing, not that of the later ``backward()`` call: the backward op's implementation
    checks again when it runs."""
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def keeps_input(weight: Tensor, lora_A: Tensor, rank) -> bool:
    """Whether the backward keeps x's values: it reads them only for dW (base weight trainable)
    and dA_r (lora_A trainable, rank > 0). Otherwise (LoRA-FA: both frozen; or rank 0) it keeps
    :func:`input_stand_in`, so the layer holds what the frozen layer holds besides t [M, r]. A
    symbolic rank (torch.compile) with a trainable lora_A keeps x: testing it would add a guard."""
    if weight.requires_grad:
        return True
    return lora_A.requires_grad and (not isinstance(rank, int) or rank > 0)


def input_stand_in(x: Tensor) -> Tensor:
    """A zero-stride tensor of x's shape, dtype and device (one element of memory) for the
    backward to read x's shape from; the backends' backward ops and dropout multipliers read
    neither its values nor its strides where dW and dA are not asked for (nor those of t's
    stand-in where dB is not)."""
    return x.new_zeros(()).expand(x.shape)


def t_for_backward(t: Tensor, lora_B_trains: bool) -> Tensor:
    """What the backward keeps of t = drop(x) A_r^T [M, r]: t where lora_B trains (dB_r = s dY^T t
    reads it), else :func:`input_stand_in` of it (dx and dA_r read grad_y B_r, never t)."""
    return t if lora_B_trains else input_stand_in(t)


def _remember(ctx, bias, rank, scaling, dropout_p):
    ctx.rank, ctx.scaling, ctx.dropout_p = rank, scaling, dropout_p
    ctx.has_bias = bias is not None


def _backward_rule(ctx, grad_y, grad_t, saved, x_kept, seed, bwd_op, mask_op):
    """Gradients for (x, W, b, A, B, rank, scaling, p, seed) from the saved tensors and context,
    in the dtypes the forward ran in: a ``backward()`` called inside an autocast region (after a
    float32 forward outside it) would otherwise run the reference's products in bfloat16.

    Where x is not kept (``x_kept`` False: ``saved`` holds its stand-in) t is a differentiable
    output and undefined gradients are not materialised: ``grad_t`` is None unless a double
    backward reaches t, and ``grad_y`` None when only t's gradient reaches the op."""
    x, weight, lora_A, lora_B, t = saved
    with autocast_off(x.device.type):
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        needs = (need_x, need_w, need_b and ctx.has_bias, need_a, need_bb)
        rank, scaling, p = ctx.rank, ctx.scaling, ctx.dropout_p
        if grad_y is None:
            grads = (None,) * 5
        elif torch.is_grad_enabled():  # create_graph=True: differentiable formulas (see module doc)
            mask = mask_op(x.detach(), p, seed) if p > 0.0 else None
            grads = differentiable_backward(grad_y, x, weight, lora_A, lora_B, rank, scaling, mask, needs,
                                            t=None if x_kept else t)
        else:
            out = bwd_op(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, *needs)
            grads = tuple(g if need else None for g, need in zip(out, needs))
        if grad_t is not None and need_x and rank > 0:
            # t = drop(x) A_r^T reaches x as (grad_t A_r) * mask. (It would reach lora_A as
            # grad_t^T drop(x), but t is differentiable only where x is not kept: lora_A frozen or rank 0.)
            grad_x_from_t = grad_t @ lora_A[:rank]
            if p > 0.0:
                grad_x_from_t = grad_x_from_t * mask_op(x.detach(), p, seed)
            grads = (grad_x_from_t if grads[0] is None else grads[0] + grad_x_from_t, *grads[1:])
    return (*grads, None, None, None, None)
