"""Loading an adapter into a model built on the meta device (a big model's skeleton, before its
weights are loaded) is refused, naming the layer, before anything changes: a meta tensor holds no
data, so the adapter would be copied into nothing, and after ``to_empty`` and loading the base
weights the pools would hold garbage (outputs off by ~1e27). Once materialised, the loaded pools
are exactly the adapter, whatever ``to_empty`` left in them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorambo import configure_model, export_peft, import_peft, load_adapter, lora_layers, save_adapter


def _net(device=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, dtype=torch.float64, device=device), nn.GELU(),
                         nn.Linear(16, 4, dtype=torch.float64, device=device))


def _trained():
    """Layer 0 adapted at rank 3 (capacity 8, alpha 4), layer 2 a trained module to save."""
    model = configure_model(_net(), {"0": 3}, capacity=8, alpha=4.0, modules_to_save=["2"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model[0].lora_B[:, :3].copy_(torch.randn(16, 3, generator=g, dtype=torch.float64))
        model[2].weight.add_(torch.randn(4, 16, generator=g, dtype=torch.float64))
    return model


def _expected(trained, x):
    """Float64 forward written out: (W + s B_r A_r) for layer 0, the saved head for layer 2."""
    layer, head, base = trained[0], trained[2], _net()
    delta = layer.scaling * layer.lora_B[:, :3].detach() @ layer.lora_A[:3].detach()
    hidden = F.gelu(F.linear(x, base[0].weight + delta, base[0].bias))
    return F.linear(hidden, head.weight.detach(), head.bias.detach())


def _save(trained, tmp_path, fmt):
    if fmt == "lorambo":
        return lambda model: load_adapter(model, save_adapter(trained, tmp_path / "a.safetensors"))
    export_peft(trained, tmp_path / "peft")
    return lambda model: import_peft(model, tmp_path / "peft")


def _all_meta(model):
    return all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("fmt", ["lorambo", "peft"])
def test_a_bare_meta_model_is_refused_and_loads_once_materialised(tmp_path, fmt):
    trained = _trained()
    load = _save(trained, tmp_path, fmt)
    model = _net("meta")
    with pytest.raises(ValueError, match=r"layer '0' has its weight on the meta device"):
        load(model)
    assert not lora_layers(model) and _all_meta(model) and model[2].weight.requires_grad
    model.to_empty(device="cpu")  # the order the message gives: materialise, load the weights, then the adapter
    model.load_state_dict(_net().state_dict())
    load(model)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), _expected(trained, x), rtol=1e-12, atol=1e-12)


def test_meta_pools_or_a_meta_module_to_save_of_a_configured_model_are_refused(tmp_path):
    file = save_adapter(_trained(), tmp_path / "a.safetensors")
    model = configure_model(_net("meta"), {"0": 1}, capacity=8, modules_to_save=["2"])
    with pytest.raises(ValueError, match=r"layer '0' has its lora_A on the meta device"):
        load_adapter(model, file)
    assert model[0].rank == 1 and _all_meta(model)
    model[0].to_empty(device="cpu")  # pools real, the head still on meta
    with pytest.raises(ValueError, match=r"module to save '2' has its weight on the meta device"):
        load_adapter(model, file)
    assert model[0].rank == 1


def test_loading_into_pools_left_uninitialised_by_to_empty_gives_exactly_the_adapter(tmp_path):
    """Configured on meta and materialised with to_empty (no reset_parameters, since an adapter is
    loaded next), the pools hold whatever the memory held; load_adapter wrote the active slots
    and left the rest (NaN here) in the inactive ones, which a filtered state_dict then loaded as
    active slots."""
    trained = _trained()
    file = save_adapter(trained, tmp_path / "a.safetensors")
    model = configure_model(_net("meta"), {"0": 3}, capacity=8, modules_to_save=["2"])
    model.to_empty(device="cpu")
    model.load_state_dict(_net().state_dict(), strict=False)
    with torch.no_grad():
        model[0].lora_A.fill_(float("nan"))  # what to_empty may leave
        model[0].lora_B.fill_(float("nan"))
    load_adapter(model, file)
    assert model[0].rank == 3
    assert torch.equal(model[0].lora_A, trained[0].lora_A) and torch.equal(model[0].lora_B, trained[0].lora_B)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), _expected(trained, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save", [save_adapter, export_peft])
def test_saving_from_the_meta_device_is_refused_naming_the_layer(tmp_path, save):
    """torch's own error ("Cannot copy out of meta tensor; no data!") named no layer."""
    model = configure_model(_net("meta"), {"0": 3}, capacity=8, modules_to_save=["2"])
    with pytest.raises(ValueError, match=rf"{save.__name__}: layer '0' has its lora_A on the meta device"):
        save(model, tmp_path / "out")
    model[0].to_empty(device="cpu")
    with pytest.raises(ValueError, match=rf"{save.__name__}: module to save '2' has its weight on the meta device"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
