"""grow_layer's new rows of A against a float64 reference: each along its direction, scaled so that
it responds to the captured inputs like a Kaiming row of the same growth, in a bfloat16 pool and
under a decision's SharedFailure (the path OnlineGrowth.update takes) as without one; a direction
that sees no input keeps the Kaiming norm. Too few directions is a ValueError that leaves the layer
as it was; a call that grows nothing ignores the directions (found by mutation testing of
lorambo/allocation/online.py)."""

import pytest
import torch

from lorambo import LoRAMBoLinear
from lorambo.allocation.online import grow_layer
from lorambo.distributed import SharedFailure

N_IN, N_OUT, RANK, NEW = 12, 10, 2, 4


def _layer(dtype):
    torch.manual_seed(0)
    layer = LoRAMBoLinear(torch.nn.Linear(N_IN, N_OUT, dtype=dtype), rank=RANK, capacity=8)
    with torch.no_grad():
        layer.lora_B[:, :RANK].normal_()
    return layer


def _inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    scales = torch.logspace(1, -1, N_IN)  # anisotropic: the ratio differs from 1 per direction
    return [(torch.randn(64, N_IN, generator=gen) * scales).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype, with_failure, rtol", [
    (torch.float64, True, 1e-12),
    (torch.bfloat16, False, 2e-2),   # bf16 rows: ~3 significant digits
    (torch.bfloat16, True, 2e-2),
])
def test_new_rows_follow_the_directions_at_the_kaiming_response(dtype, with_failure, rtol):
    layer, inputs = _layer(dtype), _inputs(dtype)
    directions = torch.randn(N_IN, NEW - RANK, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    failure = SharedFailure("grow_layer test") if with_failure else None
    old = grow_layer(layer, NEW, directions.to(dtype), generator=torch.Generator().manual_seed(3),
                     inputs=inputs, failure=failure)
    assert (old, layer.rank) == (RANK, NEW)
    # reference in float64: the plain growth's Kaiming norms, unit directions (as rounded to the
    # pool's dtype), ratio sqrt(mean over unit rows of sum_t (u.x_t)^2 / sum_t (d_j.x_t)^2)
    plain = _layer(dtype)
    plain.set_rank(NEW, generator=torch.Generator().manual_seed(3))
    norms = plain.lora_A[RANK:NEW].detach().double().norm(dim=1, keepdim=True)
    d = directions.to(dtype).double().T
    d = d / d.norm(dim=1, keepdim=True)
    x = torch.cat([t.double() for t in inputs])
    along = (x @ d.T).square().sum(0)
    random = x.square().sum() / N_IN
    want = d * norms * (random / along).sqrt().unsqueeze(1)
    torch.testing.assert_close(layer.lora_A[RANK:NEW].detach().double(), want, rtol=rtol, atol=0)
    assert not layer.lora_B[:, RANK:NEW].any()  # the output is unchanged


@pytest.mark.parametrize("given, new", [(1, 2), (0, 1)])
def test_too_few_directions_is_a_clear_error_that_changes_nothing(given, new):
    layer = _layer(torch.float64)
    before = layer.lora_A.detach().clone()
    directions = torch.randn(N_IN, given, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{given} directions for {new} new ranks"):
        grow_layer(layer, RANK + new, directions)
    assert layer.rank == RANK
    assert torch.equal(layer.lora_A.detach(), before)


def test_a_call_that_grows_nothing_ignores_the_directions():
    layer = _layer(torch.float64)
    directions = torch.randn(N_IN, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kept = layer.lora_A[:RANK - 1].detach().clone()
    assert grow_layer(layer, RANK - 1, directions) == RANK  # a lower rank: as set_rank
    assert layer.rank == RANK - 1
    assert torch.equal(layer.lora_A[:RANK - 1].detach(), kept)


def test_a_direction_that_sees_no_input_keeps_the_kaiming_norm():
    # inputs confined to the first N_IN - 1 coordinates (a rank-deficient input): along the last
    # one sum_t (d.x_t)^2 = 0, so there is no response to match and the ratio is 1, not 1e150
    layer = _layer(torch.float64)
    x = torch.randn(64, N_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, -1] = 0.0
    directions = torch.eye(N_IN, dtype=torch.float64)[:, -1:]
    grow_layer(layer, RANK + 1, directions, generator=torch.Generator().manual_seed(3), inputs=[x])
    plain = _layer(torch.float64)
    plain.set_rank(RANK + 1, generator=torch.Generator().manual_seed(3))
    want = directions.T * plain.lora_A[RANK].detach().norm()
    torch.testing.assert_close(layer.lora_A[RANK:RANK + 1].detach(), want, rtol=1e-12, atol=0)
