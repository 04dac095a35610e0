"""An empty or non-iterable ``batches`` is refused naming the public function it was passed to."""

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity import (ablation_scores, data_covariance, gradient_sensitivity, hessian_opnorm,
                                 hessian_trace)


def _optimizer_sensitivities(model, loss_fn, batches):
    opt = LoRAMBoOptimizer(model, 10**6, sensitivity_method="gradient", loss_fn=loss_fn, log_path=None)
    return opt.compute_sensitivities(batches)


def _ablation(model, loss_fn, batches):
    return ablation_scores(lorambo.configure_model(model, 2), loss_fn, batches)


CALLS = {"hessian_trace": hessian_trace, "hessian_opnorm": hessian_opnorm,
         "gradient_sensitivity": gradient_sensitivity, "data_covariance": data_covariance,
         "ablation_scores": _ablation, "LoRAMBoOptimizer.compute_sensitivities": _optimizer_sensitivities}


@pytest.mark.parametrize("who", CALLS)
def test_empty_batches_name_the_function(who, h):
    model = h.make_mlp()[0]
    with pytest.raises(ValueError, match=rf"^{who}: no batches: `batches` is empty$"):
        CALLS[who](model, h.mse, iter([]))
    with pytest.raises(TypeError, match=rf"^{who}: batches must be an iterable of batches .* got Tensor"):
        CALLS[who](model, h.mse, torch.randn(3, 4))
