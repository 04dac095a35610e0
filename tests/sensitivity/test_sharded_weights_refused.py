"""Estimators that differentiate with respect to the weights refuse an FSDP2-sharded model by
name: FSDP's forward computes with an all-gathered copy, so the sharded Parameter is not in the
graph (before, gradient_sensitivity said the loss does not use the layers)."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import gradient_sensitivity, hessian_opnorm, hessian_trace

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6, bias=False)
        self.b = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))]


def _loss(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


ESTIMATORS = {
    "gradient_sensitivity": lambda m, b: gradient_sensitivity(m, _loss, b, progress=False),
    "hessian_trace": lambda m, b: hessian_trace(m, _loss, b, num_probes=2, progress=False),
    "hessian_opnorm": lambda m, b: hessian_opnorm(m, _loss, b, progress=False),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_sharded_model_is_refused_naming_the_layers(one_process_group, name):
    torch.manual_seed(0)
    model = TwoLayers().double().requires_grad_(False)
    fully_shard(model)
    with pytest.raises(NotImplementedError, match=rf"{name}: layers \['a', 'b'\] are sharded by FSDP2"):
        ESTIMATORS[name](model, _batches())


def test_the_optimizer_names_itself_for_a_sharded_adapted_model(one_process_group):
    torch.manual_seed(0)
    model = TwoLayers().double()
    lorambo.configure_model(model, 2)
    fully_shard(model)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method="gradient")
    with pytest.raises(NotImplementedError, match=r"LoRAMBoOptimizer.compute_sensitivities: layers .* sharded by FSDP2"):
        opt.compute_sensitivities(_batches(), _loss, progress=False)


def test_the_unsharded_model_is_measured_in_the_same_process_group(one_process_group):
    """The refusal is about sharding, not about running under a process group."""
    torch.manual_seed(0)
    model = TwoLayers().double().requires_grad_(False)
    got = gradient_sensitivity(model, _loss, _batches(), progress=False)
    x, y = _batches()[0]
    w_a, w_b = model.a.weight.detach().clone().requires_grad_(), model.b.weight.detach().clone().requires_grad_()
    loss = ((torch.tanh(x @ w_a.T) @ w_b.T - y) ** 2).mean()
    ga, gb = torch.autograd.grad(loss, [w_a, w_b])
    assert got["a"] == pytest.approx(float(ga.pow(2).sum()), rel=1e-12)
    assert got["b"] == pytest.approx(float(gb.pow(2).sum()), rel=1e-12)
