"""disable_adapter's frozen modules_to_save are built from the recorded original tensors, not by
copying the trained module (its parameters and their gradients) and overwriting it: the reference
pass of DPO-style training enters the context every step."""

import copy
from collections import OrderedDict

import torch
from torch import nn

from lorambo import configure_model, disable_adapter
from lorambo.model.modules_to_save import original_state


def _trained():
    torch.manual_seed(0)
    head = nn.Sequential(OrderedDict(lin=nn.Linear(8, 3), bn=nn.BatchNorm1d(3)))
    base = nn.Sequential(OrderedDict(body=nn.Linear(5, 8), act=nn.Tanh(), head=head))
    base(torch.randn(12, 5))  # running stats away from their start values
    model = configure_model(copy.deepcopy(base), 2, target_modules=["body"], modules_to_save=["head"])
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(12, 5)).square().sum().backward()
    opt.step()
    model(torch.randn(12, 5)).square().sum().backward()  # gradients held across the context
    return base.double().eval(), model.double().eval()  # a dtype change after configure_model


def test_reference_pass_uses_originals_and_leaves_the_trained_head_alone():
    base, model = _trained()
    head = model.head
    params = {n: (p, p.detach().clone(), p.grad.clone()) for n, p in head.named_parameters()}
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with disable_adapter(model):
        frozen = model.head
        assert frozen is not head
        for name, p in frozen.named_parameters():
            assert p.dtype == torch.float64 and not p.requires_grad
            assert p.grad is None, f"the reference head's {name} carries the trained gradient"
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    assert model.head is head
    for name, p in head.named_parameters():
        same, value, grad = params[name]
        assert p is same
        torch.testing.assert_close(p, value, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)


def test_entering_does_not_copy_the_head_parameters():
    """Each entry reused the recorded original tensors: no copy of a large head per reference pass."""
    base, model = _trained()
    model.float()  # back to the dtype the originals were recorded in
    originals = original_state(model)["head"]
    for _ in range(2):
        with disable_adapter(model):
            for name, p in model.head.named_parameters():
                assert p.data_ptr() == originals[name].data_ptr(), f"{name} was copied on entry"
