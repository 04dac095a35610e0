"""Inside torch.func transforms and forward AD, ``lorambo.ops.lora_linear`` runs its composite
path (lorambo/ops/functorch_path.py), which skipped the backends' checks: rank -1 computed with
every slot but the last (A[:-1]), a rank past the capacity clipped, a lora_B wider than lora_A's
capacity, p = 1 (every element dropped) and a nan scaling ran. Now the same errors as outside a transform."""

import pytest
import torch
from torch.autograd import forward_ad

from lorambo.ops import lora_linear


def operands(b_cols=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in ((3, 4), (5, 4), (5,), (2, 4), (5, b_cols))]


@pytest.mark.parametrize("rank, b_cols, p, scaling, error, match", [
    (-1, 2, 0.0, 1.0, ValueError, r"lora_linear: rank -1 outside \[0, capacity = 2\]"),
    (3, 2, 0.0, 1.0, ValueError, r"lora_linear: rank 3 outside \[0, capacity = 2\]"),
    (True, 2, 0.0, 1.0, TypeError, r"lora_linear: rank must be an int, got True"),
    (1, 3, 0.0, 1.0, ValueError, r"lora_linear: lora_B is \(5, 3\), expected \[5, 2\]"),
    (1, 2, 1.0, 1.0, ValueError, r"lora_linear: dropout_p 1.0 must be in \[0, 1\)"),
    (1, 2, 0.0, float("nan"), ValueError, r"lora_linear: scaling must be finite, got nan"),
])
def test_torch_func_and_forward_ad_refuse_bad_arguments(rank, b_cols, p, scaling, error, match):
    x, w, b, a, bb = operands(b_cols)
    with pytest.raises(error, match=match):
        torch.func.grad(lambda a: lora_linear(x, w, b, a, bb, rank, scaling, p).sum())(a)
    with forward_ad.dual_level(), pytest.raises(error, match=match):
        lora_linear(forward_ad.make_dual(x, torch.ones_like(x)), w, b, a, bb, rank, scaling, p)


def test_composite_path_runs_only_inside_a_transform_or_a_dual_level():
    """Plain eager calls keep the backends' fused ops; torch.func and forward AD take the composite."""
    from lorambo.ops.functorch_path import needs_composite

    assert needs_composite() is False
    with forward_ad.dual_level():
        assert needs_composite() is True
    seen = []
    torch.func.vmap(lambda t: (seen.append(needs_composite()), t)[1])(torch.randn(2, 3))
    torch.func.grad(lambda t: (seen.append(needs_composite()), t.sum())[1])(torch.randn(3))
    assert seen == [True, True]
    assert needs_composite() is False
