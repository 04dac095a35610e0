"""Every public ``progress=`` argument takes True, False or None; anything else ("no", 0) was
truthy or falsy by accident (hessian_trace(progress="no") drew its bar) and is a TypeError
naming the function and the value, raised before any work."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.experiments.runner import run_experiment
from lorambo.sensitivity import (ablation_scores, data_covariance, gradient_sensitivity, hessian_opnorm,
                                 hessian_trace)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    lorambo.configure_model(model, 1, capacity=2)
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g))]


def _optimizer_call(model, batches, progress):
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method="frobenius")
    return opt.compute_sensitivities(batches, mse, progress=progress)


CALLS = {
    "hessian_trace": lambda m, b, p: hessian_trace(m, mse, b, num_probes=2, progress=p),
    "hessian_opnorm": lambda m, b, p: hessian_opnorm(m, mse, b, num_iters=2, progress=p),
    "gradient_sensitivity": lambda m, b, p: gradient_sensitivity(m, mse, b, progress=p),
    "data_covariance": lambda m, b, p: data_covariance(m, mse, b, progress=p),
    "ablation_scores": lambda m, b, p: ablation_scores(m, mse, b, progress=p),
    # "frobenius" never draws a bar: the argument is still checked
    "LoRAMBoOptimizer.compute_sensitivities": _optimizer_call,
    # checked before the config is read or a unit runs
    "run_experiment": lambda m, b, p: run_experiment(None, progress=p),
}


@pytest.mark.parametrize("value", ["no", 0, 1.0])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_progress_that_is_not_a_bool_or_none_is_refused(name, value, capsys):
    model, batches = _setup()
    with pytest.raises(TypeError, match="progress") as info:
        CALLS[name](model, batches, value)
    assert name in str(info.value) and repr(value) in str(info.value)
    assert capsys.readouterr().err == ""  # refused before any bar


@pytest.mark.parametrize("name", [n for n in CALLS if not n.startswith("run_")])
def test_true_false_and_none_are_accepted(name):
    model, batches = _setup()
    for value in (True, False, None):
        CALLS[name](model, batches, value)
