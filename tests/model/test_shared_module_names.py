"""A module registered at two places (a block shared by an encoder and a decoder) is listed by
``named_modules()`` under its first name only, so naming it by its second name said the target
"matches no module" (or suggested another name), though the model holds a module there. The
error now says it is the shared module's second name and why lorambo refuses it."""

import pytest
import torch
from torch import nn

from lorambo import configure_model, lora_layers


class _SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.decoder = self.encoder  # one module, two names
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.decoder(self.encoder(x)))


_SECOND_NAME = (r"'decoder.0' is another name of module 'encoder.0', which is used 2 times \(as \['encoder.0', "
                r"'decoder.0'\]\); lorambo adapts a module at one place only")


@pytest.mark.parametrize("kwargs,message", [
    ({"ranks": 2, "target_modules": ["decoder.0"]}, "target_modules entry 'decoder.0' matches no module of "
                                                    "_SharedBlock; " + _SECOND_NAME),
    ({"ranks": 2, "target_modules": r"decoder\.0"}, r"target_modules regex 'decoder\\\\.0' matches no module of "
                                                    "_SharedBlock; " + _SECOND_NAME),
    ({"ranks": {"decoder.0": 2}}, "module 'decoder.0' not found in _SharedBlock; " + _SECOND_NAME),
], ids=["list", "regex", "ranks"])
def test_the_second_name_of_a_shared_module_is_named_as_such(kwargs, message):
    model = _SharedBlock()
    with pytest.raises(ValueError, match=message):
        configure_model(model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert model(torch.randn(3, 4)).shape == (3, 2)
