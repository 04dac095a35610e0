"""The gradient and Hessian sensitivities differentiate with respect to each layer's weight. A
weight computed by a parametrization (nn.utils.parametrizations.weight_norm) is a new tensor at
every access, so none of the one held reached the loss: LoRAMBoOptimizer warned "no gradient
reaches layer(s) ['0'] (the loss does not use them)" and gave the layer no rank. They now refuse
such layers, naming them and the methods that work; those measure the computed weight."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lorambo
from lorambo.sensitivity import gradient_sensitivity, hessian_trace


def _model():
    torch.manual_seed(0)
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 5, dtype=torch.float64)), nn.Tanh(),
                         nn.Linear(5, 4, dtype=torch.float64), nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64))


def _loss(model, batch):
    return (model(batch[0]) - batch[1]).square().mean()


_BATCHES = [(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))]
_REFUSED = r"the weights of layers \['0'\] are computed by a parametrization .*sensitivity_method='frobenius'"


@pytest.mark.parametrize("method", ["hessian", "gradient"])
def test_the_optimizer_refuses_to_differentiate_a_parametrized_weight(method):
    optimizer = lorambo.LoRAMBoOptimizer(_model(), total_budget=40, sensitivity_method=method,
                                         target_modules=["0", "2"])
    with pytest.raises(NotImplementedError, match="LoRAMBoOptimizer.compute_sensitivities: " + _REFUSED):
        optimizer.compute_sensitivities(_BATCHES, _loss)


@pytest.mark.parametrize("estimator", [gradient_sensitivity, hessian_trace])
def test_the_estimators_refuse_it_also_on_an_adapted_model(estimator):
    model = lorambo.configure_model(_model(), 2, target_modules=["0", "2"])
    with pytest.raises(NotImplementedError, match=_REFUSED):
        estimator(model, _loss, _BATCHES)


def test_frobenius_measures_the_computed_weight_of_an_adapted_layer():
    model = lorambo.configure_model(_model(), 2, target_modules=["0", "2"])
    scores = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method="frobenius").compute_sensitivities()
    weight_normed = model[0].base_layer.parametrizations.weight
    g, v = weight_normed.original0.detach(), weight_normed.original1.detach()
    want = {"0": (g * v / v.norm(dim=1, keepdim=True)).square().sum().item(),
            "2": model[2].base_layer.weight.detach().square().sum().item()}
    assert scores.keys() == want.keys()
    for name in want:
        assert scores[name] == pytest.approx(want[name], rel=1e-12)
