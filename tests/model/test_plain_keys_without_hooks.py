"""Loading a plain model's state_dict into the adapted one finds the base layer's keys without
calling ``base.state_dict()``, so the user's state_dict hooks on the base (here: two that log)
run on saves only, not on every load; the keys are still
those of the base's own state_dict (a subclass's own keys and parametrizations included)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from lorambo import configure_model
from lorambo.nn.plain_keys import _base_keys

DT = torch.float64


class ScaledLinear(nn.Linear):
    """A Linear whose checkpoints carry a key of its own (as quantized layers' do)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale_format"] = torch.tensor(1)


BASES = {
    "plain": lambda: nn.Linear(5, 4, dtype=DT),
    "no bias": lambda: nn.Linear(5, 4, bias=False, dtype=DT),
    "weight_norm": lambda: parametrizations.weight_norm(nn.Linear(5, 4, dtype=DT)),
    "spectral_norm": lambda: parametrizations.spectral_norm(nn.Linear(5, 4, dtype=DT)),
    "own keys": lambda: ScaledLinear(5, 4, dtype=DT),
}


@pytest.mark.parametrize("kind", BASES)
def test_base_keys_are_its_state_dict_keys(kind):
    base = BASES[kind]()
    want = list(dict.fromkeys(["weight", "bias", *base.state_dict(keep_vars=True)]))
    assert _base_keys(base) == want


def _hooked(log):
    model = nn.Sequential(nn.Linear(5, 4, dtype=DT))
    base = model[0]
    base.register_state_dict_post_hook(lambda module, state, prefix, local_metadata: log.append(prefix))
    base.register_state_dict_pre_hook(lambda module, prefix, keep_vars: log.append(("pre", prefix)))
    return model


def test_a_load_runs_no_state_dict_hook_of_the_base():
    plain = nn.Sequential(nn.Linear(5, 4, dtype=DT))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    log = []
    model = configure_model(_hooked(log), 2)
    result = model.load_state_dict(state, strict=False)
    assert log == []
    assert not result.unexpected_keys
    base = model[0].base_layer
    assert torch.equal(base.weight, state["0.weight"]) and torch.equal(base.bias, state["0.bias"])
    model.state_dict()  # a save still runs them
    assert log == [("pre", "0.base_layer."), "0.base_layer."]
