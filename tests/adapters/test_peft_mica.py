"""A peft MiCA adapter (init_lora_weights="mica") trains lora_A alone: imported or converted, its
lora_B pools are frozen, and training moves the model as a float64 LoRA with B held fixed."""

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lorambo import export_peft, from_peft, import_peft, lora_layers

NAMES = ("l1", "l2")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _saved_mica(tmp_path):
    """A float32 base (peft computes MiCA's SVD in float32 only) and its saved MiCA adapter with a trained A."""
    torch.manual_seed(0)
    base = _Net()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, target_modules=list(NAMES),
                                                                 init_lora_weights="mica"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in NAMES:
            a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
            a.copy_(torch.randn(a.shape, generator=g))
    peft_model.save_pretrained(tmp_path)
    return base, tmp_path


def _reference_sgd(base, folder, xs, lr):
    """Hand-written float64 W x + b + (alpha/r) B A x for both layers, SGD on A only."""
    saved = {k: v.double() for k, v in load_file(folder / "adapter_model.safetensors").items()}
    a = {n: saved[f"base_model.model.{n}.lora_A.weight"].clone().requires_grad_(True) for n in NAMES}
    b = {n: saved[f"base_model.model.{n}.lora_B.weight"] for n in NAMES}

    def forward(x):
        for i, name in enumerate(NAMES):
            layer = getattr(base, name)
            x = x @ layer.weight.double().t() + layer.bias.double() + 5 / 3 * (x @ a[name].t()) @ b[name].t()
            x = torch.relu(x) if i == 0 else x
        return x

    for x in xs:
        grads = torch.autograd.grad(forward(x).pow(2).mean(), list(a.values()))
        with torch.no_grad():
            for tensor, grad in zip(a.values(), grads):
                tensor -= lr * grad
    return forward, a, b


@pytest.mark.parametrize("how", ["import_peft", "from_peft"])
def test_mica_adapter_trains_its_a_alone(tmp_path, how):
    """lora_B stayed trainable: after 3 SGD steps B had moved and the outputs were off."""
    base, folder = _saved_mica(tmp_path)
    if how == "import_peft":
        model = import_peft(copy.deepcopy(base).double(), folder)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
        model = from_peft(peft_model).double()
    for layer in lora_layers(model).values():
        assert layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for x in xs:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    forward, a, b = _reference_sgd(base, folder, xs, lr=0.05)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), forward(x), rtol=1e-12, atol=1e-12)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.lora_A[:3].detach(), a[name].detach(), rtol=1e-12, atol=1e-12)
        assert torch.equal(layer.lora_B[:, :3].detach(), b[name])


@pytest.mark.parametrize("init", ["mica", "MiCA"])
def test_lora_b_is_frozen_where_peft_freezes_it(init):
    """peft picks MiCA's frozen lora_B by the exact value "mica"; "MiCA" gets MiCA's
    initialisation with a trainable lora_B, and so does the converted model."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_Net(), LoraConfig(r=3, target_modules=list(NAMES), init_lora_weights=init))
    peft_trains_b = {n: peft_model.base_model.model.get_submodule(n).lora_B["default"].weight.requires_grad
                     for n in NAMES}
    assert set(peft_trains_b.values()) == {init != "mica"}
    model = from_peft(peft_model)
    assert {n: layer.lora_B.requires_grad for n, layer in lora_layers(model).items()} == peft_trains_b


def test_an_adapter_with_frozen_b_exports_as_mica_and_peft_keeps_b_frozen(tmp_path):
    """export_peft wrote init_lora_weights=True: peft loaded the adapter with every lora_B trainable."""
    base, folder = _saved_mica(tmp_path / "peft")
    model = import_peft(copy.deepcopy(base), folder)
    export_peft(model, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back", is_trainable=True)
    for name, layer in lora_layers(model).items():
        theirs = reloaded.base_model.model.get_submodule(name)
        assert theirs.lora_A["default"].weight.requires_grad and not theirs.lora_B["default"].weight.requires_grad
        assert torch.equal(theirs.lora_B["default"].weight, layer.lora_B[:, :3])  # loaded over MiCA's own init
        assert torch.equal(theirs.lora_A["default"].weight, layer.lora_A[:3])


def test_frozen_b_in_some_layers_only_is_written_trainable_with_a_warning(tmp_path):
    base, folder = _saved_mica(tmp_path / "peft")
    model = import_peft(copy.deepcopy(base), folder)
    lora_layers(model)["l2"].lora_B.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"lora_B pools are frozen and others not \(l1: True, l2: False\)"):
        export_peft(model, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_a_model_frozen_whole_exports_as_plain_lora(tmp_path):
    """model.requires_grad_(False) before exporting froze every lora_B too: export_peft wrote
    MiCA, and peft's is_trainable=True load kept every B frozen."""
    base, folder = _saved_mica(tmp_path / "peft")
    model = import_peft(copy.deepcopy(base), folder)
    for layer in lora_layers(model).values():
        layer.lora_B.requires_grad_(True)
    model.requires_grad_(False)
    export_peft(model, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["init_lora_weights"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back", is_trainable=True)
    for name, layer in lora_layers(model).items():
        theirs = reloaded.base_model.model.get_submodule(name)
        assert theirs.lora_A["default"].weight.requires_grad and theirs.lora_B["default"].weight.requires_grad
        assert torch.equal(theirs.lora_B["default"].weight, layer.lora_B[:, :3])
        assert torch.equal(theirs.lora_A["default"].weight, layer.lora_A[:3])
