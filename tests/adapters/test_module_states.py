"""load_module_states: strict loads, and the modules already loaded get their old values back."""

import pytest
import torch
from torch import nn

from lorambo.adapters.module_states import load_module_states


def test_a_state_missing_a_key_is_refused_and_the_modules_loaded_before_it_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new_first = {"weight": torch.randn(4, 3), "bias": torch.randn(4)}
    with pytest.raises(RuntimeError, match="Missing key.*bias"):  # strict: a missing key is an error
        load_module_states(model, {"0": new_first, "1": {"weight": torch.randn(2, 4)}})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    load_module_states(model, {"0": new_first})
    assert torch.equal(model[0].weight, new_first["weight"]) and torch.equal(model[0].bias, new_first["bias"])
