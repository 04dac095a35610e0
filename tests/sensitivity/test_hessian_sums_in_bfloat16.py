"""Hessian-vector products of a bfloat16 model are summed over batches in at least float32. In
bfloat16 each addition to the running sum rounded it to 8 bits, and past ~2/u = 512 batches of
like products the sum stopped growing: hutch++ / xtrace traces and power-iteration norms over
hundreds of batches came out several percent low. Against the same estimator on the same
(bfloat16-valued) weights and batches in float64."""

import pytest
import torch

from lorambo.sensitivity import hessian_opnorm, hessian_trace

U = 2.0 ** -8  # bfloat16's unit roundoff


def _net(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 1, bias=False))
    return model.to(torch.bfloat16).to(dtype)  # the same bfloat16 values in both dtypes


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, generator=gen).to(torch.bfloat16), torch.randn(2, 1, generator=gen).to(torch.bfloat16))
            for _ in range(n)]


def _loss(model, batch):
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in batch)
    return (model(x) - y).double().square().mean()


@pytest.mark.parametrize("estimate", [
    lambda model, batches: hessian_trace(model, _loss, batches, modules=["0"], method="hutch++", num_probes=6,
                                         probes_per_pass=6, progress=False)["0"].value,
    lambda model, batches: hessian_opnorm(model, _loss, batches, modules=["0"], num_iters=2, probes_per_pass=1,
                                          progress=False)["0"].value,
], ids=["hutch++", "opnorm"])
def test_many_batches_of_a_bfloat16_model_match_float64(estimate):
    batches = _batches(400)
    got = estimate(_net(torch.bfloat16), batches)
    want = estimate(_net(torch.float64), batches)
    # each product carries a few bfloat16 roundings; their mean over batches no more
    assert abs(got - want) <= 2 * U * abs(want), (got, want)
