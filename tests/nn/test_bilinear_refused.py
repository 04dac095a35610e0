"""nn.Bilinear (weight [out, in1, in2]) is refused for what it is, a two-input bilinear form, not
as "stacked 3-D parameters, as fused MoE experts do", and the default targets do not warn that a
model holding one has fused MoE experts. Stacked experts keep the MoE message and warning."""

import warnings

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear, configure_model, lora_layers


class StackedExperts(nn.Module):
    """transformers 5's fused MoE experts' layout: one [experts, 2 * ffn, hidden] tensor."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 12, 8))


class Net(nn.Module):
    def __init__(self, odd: nn.Module):
        super().__init__()
        self.odd = odd
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 2)  # an output layer: not a default target


def _default_target_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_model(model, 2)
    return [str(w.message) for w in caught]


def test_bilinear_is_refused_as_a_two_input_bilinear_form():
    torch.manual_seed(0)
    bilinear = nn.Bilinear(4, 5, 6)
    want = (r"Bilinear computes x1\^T A x2 \+ b from two inputs: its weight \[6, 4, 5\] is one 4x5 bilinear "
            r"form per output")
    with pytest.raises(TypeError, match=r"LoRAMBoLinear: can only wrap nn.Linear or transformers Conv1D: " + want) \
            as wrapped:
        LoRAMBoLinear(bilinear, rank=2)
    model = Net(bilinear)
    with pytest.raises(TypeError, match=r"module 'odd' \(Bilinear\) matches target_modules entry 'odd' but cannot "
                                        r"be adapted: " + want) as named:
        configure_model(model, 2, target_modules=["odd"])
    assert not lora_layers(model)
    for error in (wrapped, named):
        assert "MoE" not in str(error.value) and "stacked" not in str(error.value)
    with pytest.raises(ValueError, match=r"'odd.weight' matches no module") as by_parameter:
        configure_model(model, 2, target_modules=["odd.weight"])
    assert "MoE" not in str(by_parameter.value)

    # the default targets leave it out as any other non-Linear module, without an MoE warning
    model = Net(nn.Bilinear(4, 5, 6))
    assert not [m for m in _default_target_warnings(model) if "MoE" in m]
    assert set(lora_layers(model)) == {"fc"}


def test_stacked_experts_keep_the_fused_moe_message_and_warning():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"StackedExperts holds its weights as stacked 3-D parameters "
                                        r"\(gate_up_proj \[3, 12, 8\]\), as fused MoE experts do"):
        LoRAMBoLinear(StackedExperts(), rank=2)
    model = Net(StackedExperts())
    assert [m for m in _default_target_warnings(model)
            if "hold stacked 3-D weights (fused MoE experts: 'odd' (StackedExperts))" in m]
    assert set(lora_layers(model)) == {"fc"}
