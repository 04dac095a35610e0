"""The registered ops' checks recognise a valid call by one quick test (``_call_fits``,
``_backward_operands_fit``, the seed's) before the checks one by one. The quick tests must never
accept what the checks refuse, else a bad call would compute: each case below breaks one
condition and must be refused by both; the common valid calls must take the quick path."""

import math

import pytest
import torch

from lorambo.ops import op_operands
from lorambo.ops.op_operands import check_backward_call, check_forward_call

M, K, N, CAP, RANK = 4, 6, 5, 3, 2


def operands(**swap):
    gen = torch.Generator().manual_seed(1)
    shapes = dict(x=(M, K), weight=(N, K), bias=(N,), lora_A=(CAP, K), lora_B=(N, CAP), grad_y=(M, N), t=(M, RANK))
    made = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    made.update(swap)
    return made


def scalars(**swap):
    values = dict(rank=RANK, scaling=0.5, dropout_p=0.0, seed=torch.tensor(3))
    values.update(swap)
    return values


def meta(shape):
    return torch.empty(shape, device="meta")


def double(shape):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


BROKEN_OPERANDS = {
    "x 1-D": dict(x=torch.randn(K)), "x 3-D": dict(x=torch.randn(2, M, K)), "x last dim": dict(x=torch.randn(M, K + 1)),
    "x a list": dict(x=[[1.0] * K] * M), "x meta": dict(x=meta((M, K))), "x float64": dict(x=double((M, K))),
    "weight 1-D": dict(weight=torch.randn(N * K)), "weight meta": dict(weight=meta((N, K))),
    "weight float64": dict(weight=double((N, K))),
    "lora_A in dim": dict(lora_A=torch.randn(CAP, K + 1)), "lora_A 3-D": dict(lora_A=torch.randn(1, CAP, K)),
    "lora_A meta": dict(lora_A=meta((CAP, K))), "lora_A float64": dict(lora_A=double((CAP, K))),
    "lora_B wider": dict(lora_B=torch.randn(N, CAP + 1)), "lora_B out": dict(lora_B=torch.randn(N + 1, CAP)),
    "lora_B meta": dict(lora_B=meta((N, CAP))), "lora_B float64": dict(lora_B=double((N, CAP))),
    "bias [1, N]": dict(bias=torch.randn(1, N)), "bias [N + 1]": dict(bias=torch.randn(N + 1)),
    "bias meta": dict(bias=meta((N,))), "bias float64": dict(bias=double((N,))), "bias a list": dict(bias=[0.0] * N),
}
BROKEN_SCALARS = {
    "rank above": dict(rank=CAP + 1), "rank negative": dict(rank=-1), "rank True": dict(rank=True),
    "rank float": dict(rank=1.0), "scaling nan": dict(scaling=math.nan), "scaling inf": dict(scaling=math.inf),
    "scaling tensor": dict(scaling=torch.tensor(0.5)), "scaling str": dict(scaling="0.5"),
    "p one": dict(dropout_p=1.0), "p tensor": dict(dropout_p=torch.tensor(0.5)), "rank tensor": dict(rank=torch.tensor(1)),
    "p negative": dict(dropout_p=-0.1), "p True": dict(dropout_p=True),
    "seed negative": dict(dropout_p=0.5, seed=torch.tensor(-1)),
    "seed int32": dict(dropout_p=0.5, seed=torch.tensor(3, dtype=torch.int32)),
    "seed 1-D": dict(dropout_p=0.5, seed=torch.tensor([3])), "seed meta": dict(dropout_p=0.5, seed=meta(())),
    "seed None": dict(dropout_p=0.5, seed=None),
}
BROKEN_BACKWARD = {
    "grad_y rows": dict(grad_y=torch.randn(M + 1, N)), "grad_y cols": dict(grad_y=torch.randn(M, N + 1)),
    "grad_y float64": dict(grad_y=double((M, N))), "grad_y meta": dict(grad_y=meta((M, N))),
    "t rank": dict(t=torch.randn(M, RANK + 1)), "t float64": dict(t=double((M, RANK))),
    "t meta": dict(t=meta((M, RANK))), "t a list": dict(t=[[0.0] * RANK] * M),
}


def forward_call(o, s):
    check_forward_call("op", o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], s["rank"], s["scaling"],
                       s["dropout_p"], s["seed"])


def backward_call(o, s):
    check_backward_call("op", o["grad_y"], o["x"], o["weight"], o["lora_A"], o["lora_B"], o["t"], s["rank"],
                        s["scaling"], s["dropout_p"], s["seed"])


@pytest.mark.parametrize("case", sorted(BROKEN_OPERANDS))
def test_a_broken_operand_is_refused_by_the_quick_test_and_the_checks(case):
    o, s = operands(**BROKEN_OPERANDS[case]), scalars()
    assert not op_operands._call_fits(o["x"], o["weight"], o["bias"], o["lora_A"], o["lora_B"], s["rank"],
                                      s["scaling"], s["dropout_p"])
    with pytest.raises((TypeError, ValueError), match="^op: "):
        forward_call(o, s)


@pytest.mark.parametrize("case", sorted(BROKEN_SCALARS))
def test_a_broken_scalar_or_seed_is_refused_by_the_checks(case):
    with pytest.raises((TypeError, ValueError), match="^op: "):
        forward_call(operands(), scalars(**BROKEN_SCALARS[case]))


@pytest.mark.parametrize("case", sorted(BROKEN_BACKWARD))
def test_a_broken_backward_operand_is_refused_by_the_quick_test_and_the_checks(case):
    o = operands(**BROKEN_BACKWARD[case])
    assert not op_operands._backward_operands_fit(o["grad_y"], o["t"], o["x"], M, N, RANK)
    with pytest.raises((TypeError, ValueError), match="^op: "):
        backward_call(o, scalars())


@pytest.mark.parametrize("swap, scalar_swap", [
    ({}, {}), (dict(bias=None), {}), ({}, dict(rank=0)), ({}, dict(rank=CAP)), ({}, dict(dropout_p=0.5)),
    ({}, dict(scaling=-2.0))])
def test_the_common_valid_calls_take_the_quick_path(monkeypatch, swap, scalar_swap):
    """The checks one by one are not reached (they would raise here), so a valid call costs only the
    quick tests; the seed of a dropout call is still read."""
    o, s = operands(**swap), scalars(**scalar_swap)
    for name in ("check_operands", "check_scalars", "check_seed"):
        monkeypatch.setattr(op_operands, name, lambda *args, name=name: pytest.fail(f"{name} reached"))
    forward_call(o, s)
    if s["rank"] == RANK:
        backward_call(o, s)
