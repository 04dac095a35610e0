"""Growing a layer whose lora_B is frozen warns: its new slots start at B = 0 and stay zero (their
rows of A get no gradient) until lora_B trains again. Shrinking, a frozen lora_A alone
(LoRA-FA: new slots train through B), and loads that overwrite the new slots do not warn."""

import warnings

import pytest
import torch
from torch import nn

import lorambo

DT = torch.float64


def _model(freeze=("lora_B",)):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 4, dtype=DT)),
                                    2, capacity=4)
    for pool in freeze:
        getattr(lorambo.lora_layers(model)["0"], pool).requires_grad_(False)
    return model


def _warnings(edit):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edit()
    return [str(w.message) for w in caught]


def test_growing_a_frozen_b_layer_warns_and_its_new_slots_stay_zero():
    model = _model()
    layer = lorambo.lora_layers(model)["0"]
    with pytest.warns(UserWarning, match=r"'0'.*rank 2 -> 4 grows a layer whose lora_B is frozen"):
        layer.set_rank(4)  # before: silent
    new_rows = layer.lora_A[2:4].detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(5, 6, generator=gen, dtype=DT)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    # what the warning says: the new columns of B stay zero and the new rows of A never move
    assert torch.equal(layer.lora_B[:, 2:4], torch.zeros(8, 2, dtype=DT))
    assert torch.equal(layer.lora_A[2:4], new_rows)


def test_configure_model_growing_a_frozen_b_layer_warns_naming_it():
    model = _model()
    msgs = _warnings(lambda: lorambo.configure_model(model, {"0": 3, "2": 3}))
    assert len(msgs) == 1 and "'0': rank 2 -> 3 grows a layer whose lora_B is frozen" in msgs[0]


@pytest.mark.parametrize("case", ["shrink", "frozen_a", "load_adapter"])
def test_no_warning_where_the_new_slots_train_or_get_values(tmp_path, case):
    model = _model(freeze=("lora_A",) if case == "frozen_a" else ("lora_B",))
    layer = lorambo.lora_layers(model)["0"]
    if case == "load_adapter":  # the saved rank-4 adapter's values fill the grown slots
        saved = _model(freeze=())
        lorambo.lora_layers(saved)["0"].set_rank(4)
        lorambo.lora_layers(saved)["0"].lora_B.requires_grad_(False)
        file = lorambo.save_adapter(saved, tmp_path / "a.safetensors")
        assert _warnings(lambda: lorambo.load_adapter(model, file)) == []
        assert layer.rank == 4
    else:
        assert _warnings(lambda: layer.set_rank(1 if case == "shrink" else 4)) == []
