"""Analysis passes leave the model as they found it: they run it in eval mode (no BatchNorm
statistics updated, no dropout) and restore every module's flag, also when they raise."""

import pytest
import torch

from lorambo.sensitivity import (data_covariance, gradient_sensitivity, hessian_opnorm, hessian_trace,
                                 targets_without_gradient)

from model_snapshot import assert_same, snapshot
from side_effect_net import model_and_batches, mse


PASSES = {
    "gradient_sensitivity": lambda m, b, f: gradient_sensitivity(m, f, b),
    "targets_without_gradient": lambda m, b, f: targets_without_gradient(m, f, b[0]),
    "data_covariance": lambda m, b, f: data_covariance(m, f, b),
    "hessian_trace": lambda m, b, f: hessian_trace(m, f, b, num_probes=2, progress=False),
    "hessian_xtrace": lambda m, b, f: hessian_trace(m, f, b, method="xtrace", num_probes=4, progress=False),
    "hessian_opnorm": lambda m, b, f: hessian_opnorm(m, f, b, num_iters=2),
}


@pytest.mark.parametrize("name", list(PASSES))
def test_pass_leaves_model_untouched_and_runs_in_eval_mode(name):
    model, batches = model_and_batches()
    model[0].weight.grad = torch.randn_like(model[0].weight)  # a gradient the user accumulated
    before = snapshot(model)
    seen = []

    def loss_fn(m, batch):
        seen.append([mod.training for mod in m.modules()])
        return mse(m, batch)

    PASSES[name](model, batches, loss_fn)
    assert seen and all(not any(flags) for flags in seen)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", ["gradient_sensitivity", "data_covariance", "hessian_trace"])
def test_pass_that_raises_on_second_batch_restores_modes(name):
    model, batches = model_and_batches()
    before = snapshot(model)
    calls = [0]

    def loss_fn(m, batch):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyError("bad batch")
        return mse(m, batch)

    with pytest.raises(KeyError, match="bad batch"):
        PASSES[name](model, batches, loss_fn)
    assert_same(before, snapshot(model))


def test_gradient_sensitivity_uses_running_statistics_and_no_dropout():
    """Reference: the same model in eval mode, gradients taken by hand in float64."""
    model, batches = model_and_batches()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    got = gradient_sensitivity(model, mse, batches)
    ref = {"0": 0.0, "4": 0.0}
    model.eval()
    for batch in batches:
        g0, g4 = torch.autograd.grad(mse(model, batch), [model[0].weight, model[4].weight])
        ref["0"] += float(g0.pow(2).sum()) / len(batches)
        ref["4"] += float(g4.pow(2).sum()) / len(batches)
    assert got == pytest.approx(ref, rel=1e-12)
