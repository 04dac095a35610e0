"""LoRA linear on the compiled extension (backend ``ext``).

Same math and gradients as :func:`lorambo.ops.lora_linear_reference` (y = x W^T + b +
s * (drop(x) A_r^T) B_r^T; inactive slots get exactly zero gradient; double backward for
Hessian-vector products), with two differences:

- the forward and backward kernels run in C++ (``torch.ops.lorambo.lora_linear_fwd`` /
  ``lora_linear_bwd``, csrc/cpu/lora_linear_cpu.cpp): no Python between the GEMMs, the rank-r
  part parallel over rows, no [M, N] temporary besides the output;
- dropout uses the extension's counter-based Philox mask (:func:`dropout_mask_ext`), regenerated
  in the backward, not torch's generator: for the same seed the dropped elements differ from
  the reference op's (each is a valid Bernoulli(1-p) mask).

Eagerly the extension's ``torch.ops.lorambo.lora_linear`` runs (autograd in C++). Under
torch.compile the same kernels run as the custom ops ``torch.ops.lorambo_ext.*`` (see
:mod:`lorambo.ops.custom_op`): the seed travels as a 0-d CPU tensor and the rank as a symbolic
int, so the op traces with fullgraph=True, dropout included, without one graph per rank. On CUDA the extension's op
exists too (cuBLAS GEMMs + the same Philox mask), but the Triton backend is the fast path there.
"""

from __future__ import annotations

import torch

from lorambo.ext import loader as ext_loader
from lorambo.ops.custom_op import define_lora_op
from lorambo.ops.op_operands import check_multiplier_call, check_operands, check_scalars
from lorambo.ops.output_rows import rows_to_output
from lorambo.ops.seed_argument import check_seed

__all__ = ["dropout_mask_ext", "lora_linear_ext"]


# The three bodies of the ``lorambo_ext`` custom ops load the extension first: a program saved
# by torch.export or torch.jit.trace calls them in a process where nothing has resolved the
# backend yet, and ``torch.ops.lorambo`` only exists once ``lorambo._C`` is imported.
def _forward(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed):
    ext_loader.require()
    return torch.ops.lorambo.lora_linear_fwd(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed)


def _backward(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed, needs):
    ext_loader.require()
    out = torch.ops.lorambo.lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, seed,
                                            list(needs))
    return tuple(g if need else None for g, need in zip(out, needs))


def _multiplier(x, p, seed):
    ext_loader.require()
    return torch.ops.lorambo.dropout_mask(x, p, seed)


def _eager(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed):
    """Outside torch.compile: the extension's own op with its C++ autograd (same kernels, same
    backward rules, no Python between forward and backward)."""
    return torch.ops.lorambo.lora_linear(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed)


# The extension's C++ ops check their operands and scalars themselves (check_lora_args in csrc);
# the custom ops' fakes make the same checks with the C++ ops' fakes' checks (the C++ schema takes
# an int rank, so the fakes cannot call the ops with a symbolic one). 0 stands for the seed, whose
# value a fake cannot read. The extension is loaded first, as the bodies do: lorambo.ext.fake
# registers the C++ ops' fakes only when imported after lorambo._C.
def _ext_fake():
    ext_loader.require()
    from lorambo.ext import fake

    return fake


def _fwd_fake_checks(x, weight, bias, lora_A, lora_B, rank, scaling, p):
    _ext_fake().check_lora_args("lorambo::lora_linear_fwd", x, weight, bias, lora_A, lora_B, rank, scaling, p, 0)


def _bwd_fake_checks(grad_y, x, weight, lora_A, lora_B, t, rank, scaling, p, needs):
    _ext_fake().check_lora_bwd_args("lorambo::lora_linear_bwd", grad_y, x, weight, lora_A, lora_B, t, rank,
                                    scaling, p, 0, needs)


def _multiplier_fake_checks(x, p):
    _ext_fake().check_dropout_mask("lorambo::dropout_mask", x, p, 0)


_apply = define_lora_op("lorambo_ext", _forward, _backward, _multiplier, eager=_eager, checked_inside=True,
                        fake_checks=(_fwd_fake_checks, _bwd_fake_checks, _multiplier_fake_checks))


def lora_linear_ext(x, weight, bias, lora_A, lora_B, rank: int, scaling: float, dropout_p: float = 0.0,
                    seed=None):
    """LoRA linear on inputs [..., K]; weight [N, K], lora_A [cap, K], lora_B [N, cap].

    ``dropout_p > 0`` needs a ``seed``: an int in [0, 2^63) or a 0-d int64 CPU tensor.
    """
    ext_loader.require()
    return _lora_linear(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed)


def _lora_linear(x, weight, bias, lora_A, lora_B, rank, scaling, dropout_p, seed):
    """:func:`lora_linear_ext` once the extension is known to be loaded (the traced path)."""
    check_operands("lora_linear_ext", x, weight, bias, lora_A, lora_B)  # ValueErrors, as the other backends'
    check_scalars("lora_linear_ext", rank, lora_A.shape[0], scaling, dropout_p)
    if dropout_p > 0.0:
        check_seed("lora_linear_ext", seed)
    lead, k = x.shape[:-1], x.shape[-1]
    p = float(dropout_p)
    y = _apply(x.reshape(-1, k), weight, bias, lora_A, lora_B, rank, float(scaling), p, seed if p > 0.0 else 0)
    return rows_to_output(y, lead)


def dropout_mask_ext(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The multiplier (0 or 1/(1-p)) that :func:`lora_linear_ext` applies to ``x`` (shape [..., K],
    element order row-major as in the flattened [M, K] input) for this ``(p, seed)``. ``p`` in
    [0, 1); where p > 0 the seed is one the op takes (an int in [0, 2**63) or a 0-d int64 CPU
    tensor), else a ValueError: a truncated seed (3.5 -> 3) would give another seed's mask."""
    ext_loader.require()
    check_multiplier_call("dropout_mask_ext", x, p, seed)
    return torch.ops.lorambo.dropout_mask(x, float(p), int(seed) if p > 0.0 else 0)
