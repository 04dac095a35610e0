"""A rank change given something else as its optimizer or generator refuses it before any change."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.nn import keep_components_many


def _trained_layer():
    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(8, 8), 3, capacity=6, name="fc")
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(2):
        layer(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
    return layer, optimizer


def _snapshot(layer, optimizer):
    return [t.clone() for t in (layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad)] + \
        [v.clone() for p in (layer.lora_A, layer.lora_B) for v in optimizer.state[p].values()]


class _Only:
    """An object with only one of an optimizer's two attributes (``state``, ``param_groups``)."""

    def __init__(self, **attributes):
        vars(self).update(attributes)


OPT = (r"must be a torch optimizer \(the one that steps the LoRA pools, with .state and .param_groups\), a list of them, "
       r"or None, got ")
CALLS = {
    "set_rank, a parameter list": (lambda l, o: l.set_rank(5, optimizer=list(l.parameters())),
                                   r"LoRAMBoLinear 'fc'.set_rank: optimizer\[0\] " + OPT + "Parameter"),
    "set_rank, the layer": (lambda l, o: l.set_rank(1, optimizer=l),
                            r"LoRAMBoLinear 'fc'.set_rank: optimizer " + OPT + "LoRAMBoLinear"),
    "set_rank, a seed": (lambda l, o: l.set_rank(5, optimizer=o, generator=0),
                         r"LoRAMBoLinear 'fc'.set_rank: generator must be a torch.Generator or None, got 0"),
    "keep_components, a scheduler in the list": (
        lambda l, o: l.keep_components([2, 0], optimizer=[o, torch.optim.lr_scheduler.StepLR(o, 1)]),
        r"LoRAMBoLinear 'fc'.keep_components: optimizer\[1\] " + OPT + "StepLR"),
    "keep_components_many": (lambda l, o: keep_components_many([(l, [1])], optimizer=o.state),
                             r"keep_components_many: optimizer " + OPT + "defaultdict"),
    "set_rank, state without param_groups": (lambda l, o: l.set_rank(5, optimizer=_Only(state=o.state)),
                                             r"LoRAMBoLinear 'fc'.set_rank: optimizer " + OPT + "_Only"),
    "set_rank, param_groups without state": (
        lambda l, o: l.set_rank(5, optimizer=[o, _Only(param_groups=o.param_groups)]),
        r"LoRAMBoLinear 'fc'.set_rank: optimizer\[1\] " + OPT + "_Only"),
    "reset_slot_state, swapped": (lambda l, o: lorambo.reset_slot_state(l, o, [0]),
                                  r"reset_slot_state: optimizer " + OPT + "LoRAMBoLinear"),
    "reset_slot_state, a plain layer": (lambda l, o: lorambo.reset_slot_state(o, l.base_layer, [0]),
                                        r"reset_slot_state: layer must be a LoRAMBoLinear, got Linear"),
}


@pytest.mark.parametrize("name", CALLS)
def test_bad_optimizer_or_generator_changes_nothing(name):
    call, message = CALLS[name]
    layer, optimizer = _trained_layer()
    before = _snapshot(layer, optimizer)
    with pytest.raises(TypeError, match=message):
        call(layer, optimizer)
    assert layer.rank == 3
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(layer, optimizer), before, strict=True))
