"""Unfreezing a layer frozen for a phase with layer.requires_grad_(True) turns its base weight and
bias back on too; an optimizer built from the parameters that require grad then trains them, and
an adapter file (which holds the adapter alone) loses what they learnt. The optimizer's first step
warns, naming the layer. Unfreezing the pools alone does not warn, and the saved adapter gives the
trained model's outputs."""

import warnings

import pytest
import torch
from torch import nn

import lorambo

DT = torch.float64


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 4, dtype=DT))


def _phases(unfreeze):
    """Phase 1 trains layer '2' with '0' frozen; phase 2 unfreezes '0' and builds a new optimizer.
    Returns (model, the warnings of phase 2)."""
    model = lorambo.configure_model(_base(), 2, capacity=4)
    first = lorambo.lora_layers(model)["0"]
    first.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=gen, dtype=DT)
    for phase in (1, 2):
        if phase == 2:
            unfreeze(first)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
    return model, [str(w.message) for w in caught], x


def test_a_thawed_base_trained_by_an_optimizer_warns_naming_the_layer(tmp_path):
    model, msgs, x = _phases(lambda layer: layer.requires_grad_(True))
    assert len(msgs) == 1 and "trains 2 base weights that lorambo froze" in msgs[0] \
        and "LoRAMBoLinear '0'" in msgs[0] and "lora_B.requires_grad_(True)" in msgs[0]  # before: silent
    # what it warns about: the adapter file does not give the trained model back
    reloaded = lorambo.load_adapter(_base(), lorambo.save_adapter(model, tmp_path / "a.safetensors"))
    assert not torch.allclose(reloaded(x), model(x))


def test_unfreezing_the_pools_alone_does_not_warn_and_saves_whole(tmp_path):
    def unfreeze(layer):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)

    model, msgs, x = _phases(unfreeze)
    assert msgs == []
    reloaded = lorambo.load_adapter(_base(), lorambo.save_adapter(model, tmp_path / "a.safetensors"))
    assert torch.equal(reloaded(x), model(x))
