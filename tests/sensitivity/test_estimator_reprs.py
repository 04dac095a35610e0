"""repr of FisherProxy and AdaLoRAImportance says what they measure and where they stand, and
never raises, not even for one whose constructor failed half-way (as a debugger shows it)."""

import torch

import lorambo
from lorambo.sensitivity import AdaLoRAImportance, FisherProxy


def adapted_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    return lorambo.configure_model(model, 2)


def test_fisher_proxy_repr_shows_its_settings_and_whether_it_is_attached():
    proxy = FisherProxy(adapted_model(), reduction="sum", sketch_dim=4)
    assert repr(proxy) == "FisherProxy(2 layers, reduction='sum', sketch_dim=4, attached=False)"
    with proxy:
        assert repr(proxy) == "FisherProxy(2 layers, reduction='sum', sketch_dim=4, attached=True)"
    half_built = FisherProxy.__new__(FisherProxy)
    assert repr(half_built) == "FisherProxy(0 layers, reduction=None, sketch_dim=None, attached=False)"


def test_adalora_importance_repr_counts_its_updates():
    model = adapted_model()
    importance = AdaLoRAImportance(model, beta1=0.5)
    assert repr(importance) == "AdaLoRAImportance(2 layers, beta1=0.5, beta2=0.85, updates=0)"
    model(torch.randn(3, 8)).pow(2).sum().backward()
    importance.update()
    assert repr(importance) == "AdaLoRAImportance(2 layers, beta1=0.5, beta2=0.85, updates=1)"
    assert repr(AdaLoRAImportance.__new__(AdaLoRAImportance)) == \
        "AdaLoRAImportance(0 layers, beta1=None, beta2=None, updates=0)"
