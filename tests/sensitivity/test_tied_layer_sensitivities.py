"""Layers that share one weight are each measured on their own use of it (lorambo/sensitivity/tied.py):
against float64 derivatives with respect to one use, the other held fixed."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import gradient_sensitivity, hessian_opnorm, hessian_trace

DT = torch.float64


class TiedPair(nn.Module):
    """``b`` holds ``a``'s weight: one Parameter, two layers (and two adapters once configured)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False, dtype=DT)
        self.b = nn.Linear(4, 4, bias=False, dtype=DT)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 3, dtype=DT)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def make():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT))
               for n in (6, 9)]
    return TiedPair(), batches


def use_loss(model, batches, layer, w, prefix=""):
    """Mean loss over ``batches`` with ``w`` in place of ``layer``'s use of the weight only."""
    params = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    params[f"{layer}.{prefix}weight"] = w
    return sum(mse(lambda x: torch.func.functional_call(model, params, (x,), tie_weights=False), b)
               for b in batches) / len(batches)


def reference(model, batches, prefix=""):
    """Per layer: mean over batches of ||dL_b/dW||^2, Tr(H) and max |eig(H)| of its own use."""
    out = {}
    for layer in ("a", "b", "c"):
        w0 = getattr(model, layer).get_parameter(prefix + "weight").detach().clone()
        grads = [torch.autograd.grad(use_loss(model, [b], layer, w, prefix), w)[0]
                 for b in batches for w in [w0.clone().requires_grad_(True)]]
        h = torch.autograd.functional.hessian(
            lambda flat: use_loss(model, batches, layer, flat.view(w0.shape), prefix), w0.reshape(-1))
        out[layer] = (sum(float(g.pow(2).sum()) for g in grads) / len(batches), float(h.trace()),
                      float(torch.linalg.eigvalsh(h).abs().max()))
    return out


def test_tied_layers_are_measured_on_their_own_use_and_the_tie_is_kept():
    model, batches = make()
    ref = reference(model, batches)
    assert abs(ref["a"][1] - ref["b"][1]) > 0.1  # the two uses differ: a shared value would be wrong for one
    shared = model.a.weight.requires_grad_(False)  # frozen, as a base weight: it must stay so
    grad = gradient_sensitivity(model, mse, batches)
    # Hutchinson's error is Gaussian to a good approximation at 600 probes: 5 standard errors per
    # layer (seeded, so deterministic; a fresh seed would fail with probability ~2e-6 over 3 layers)
    trace = hessian_trace(model, mse, batches, modules=["a", "b", "c"], num_probes=600, seed=3)
    norm = hessian_opnorm(model, mse, batches, num_iters=300, tol=0.0)
    for layer, (g, t, top) in ref.items():
        assert grad[layer] == pytest.approx(g, rel=1e-10), layer
        assert abs(trace[layer].value - t) <= 5 * trace[layer].stderr, (layer, trace[layer], t)
        assert norm[layer].value == pytest.approx(top, rel=1e-6), layer
    assert model.a.weight is shared and model.b.weight is shared  # the tie, not a copy
    assert not shared.requires_grad and shared.grad is None


def test_allocator_measures_a_configured_model_with_tied_base_weights():
    model, batches = make()
    ref = reference(model, batches)
    with pytest.warns(UserWarning, match="tied"):
        lorambo.configure_model(model, 2)
    shared = model.a.base_layer.weight
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=40, sensitivity_method="gradient")
    ranks = opt.compute_optimal_ranks(batches, mse)
    assert set(ranks) == {"a", "b", "c"}
    for layer, (g, _, _) in ref.items():  # the adapters are zero: the base model's derivatives
        assert opt.sensitivities[layer] == pytest.approx(g, rel=1e-10), layer
    assert model.a.base_layer.weight is shared and model.b.base_layer.weight is shared


def test_a_layer_named_twice_is_refused_by_name():
    model, batches = make()
    with pytest.raises(ValueError, match=r"\['a'\] more than once"):
        gradient_sensitivity(model, mse, batches, modules=["a", "c", "a"])
