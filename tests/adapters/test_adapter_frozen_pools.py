"""save_adapter / load_adapter keep which pools are frozen: a MiCA adapter's lora_B, LoRA-FA's
lora_A, a layer frozen whole. Reference: float64 plain tensors of the active slices, trained by
SGD with the same parts frozen."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorambo
from lorambo.adapters.format import build_header

DT = torch.float64
# layer -> its pools that do not train: MiCA, LoRA-FA, frozen whole, trainable
FROZEN = {"0": {"lora_B"}, "2": {"lora_A"}, "4": {"lora_A", "lora_B"}, "6": set()}

pytestmark = pytest.mark.usefixtures("one_thread")


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 7, dtype=DT), nn.Tanh(),
                         nn.Linear(7, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 4, dtype=DT))


def _adapted():
    model = lorambo.configure_model(_base(), 2, capacity=4, alpha=3.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lorambo.lora_layers(model).items():
            layer.lora_A[:2].normal_(generator=gen)
            layer.lora_B[:, :2].normal_(generator=gen)
            for pool in FROZEN[name]:
                getattr(layer, pool).requires_grad_(False)
    return model


def _reference(model):
    """[(W, b, A, B, scaling)] of every layer, float64 leaves, frozen where FROZEN says."""
    ref = []
    for i, module in enumerate(model):
        if isinstance(module, nn.Tanh):
            continue
        layer = lorambo.lora_layers(model)[str(i)]
        r = layer.rank
        a = layer.lora_A[:r].detach().clone().requires_grad_("lora_A" not in FROZEN[str(i)])
        b = layer.lora_B[:, :r].detach().clone().requires_grad_("lora_B" not in FROZEN[str(i)])
        ref.append((layer.weight.detach().clone(), layer.bias.detach().clone(), a, b, layer.scaling))
    return ref


def _ref_forward(ref, x):
    for i, (w, bias, a, b, s) in enumerate(ref):
        x = x @ w.T + bias + s * (x @ a.T) @ b.T
        x = torch.tanh(x) if i < len(ref) - 1 else x
    return x


def _train(params, forward, batches, lr=0.05):
    opt = torch.optim.SGD(params, lr=lr)
    for x, y in batches:
        ((forward(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(9, 6, generator=gen, dtype=DT), torch.randn(9, 4, generator=gen, dtype=DT))
            for _ in range(3)]


@pytest.mark.parametrize("into", ["bare", "configured"])
def test_loaded_adapter_trains_what_the_saved_one_trained(tmp_path, into):
    saved = _adapted()
    ref = _reference(saved)
    file = lorambo.save_adapter(saved, tmp_path / "a.safetensors")
    model = _base() if into == "bare" else lorambo.configure_model(_base(), 3, capacity=4)
    lorambo.load_adapter(model, file)  # before, every pool came back trainable and trained
    layers = lorambo.lora_layers(model)
    assert {n: {p for p in ("lora_A", "lora_B") if not getattr(m, p).requires_grad}
            for n, m in layers.items()} == FROZEN
    batches = _batches()
    _train([p for p in model.parameters() if p.requires_grad], model, batches)
    _train([t for entry in ref for t in entry[2:4] if t.requires_grad], lambda x: _ref_forward(ref, x), batches)
    for (name, layer), (_, _, a, b, _) in zip(layers.items(), ref, strict=True):
        assert torch.allclose(layer.lora_A[:2], a, rtol=1e-10, atol=1e-12), name
        assert torch.allclose(layer.lora_B[:, :2], b, rtol=1e-10, atol=1e-12), name
    x = _batches()[0][0]
    assert torch.allclose(model(x), _ref_forward(ref, x), rtol=1e-10, atol=1e-12)


def _rewrite_layers(file, edit):
    with safe_open(str(file), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(header["layers"])
    edit(layers)
    save_file(tensors, str(file), metadata=build_header(layers, tensors))


def test_a_file_saved_before_frozen_pools_were_kept_leaves_the_model_flags(tmp_path):
    file = lorambo.save_adapter(_adapted(), tmp_path / "a.safetensors")
    _rewrite_layers(file, lambda layers: [info.pop("frozen") for info in layers.values()])
    model = lorambo.configure_model(_base(), 3, capacity=4)
    lorambo.lora_layers(model)["2"].lora_B.requires_grad_(False)
    lorambo.load_adapter(model, file)
    flags = {n: (m.lora_A.requires_grad, m.lora_B.requires_grad) for n, m in lorambo.lora_layers(model).items()}
    assert flags == {"0": (True, True), "2": (True, False), "4": (True, True), "6": (True, True)}


@pytest.mark.parametrize("value", [["lora_C"], ["lora_A", "lora_A"], "lora_B", None])
def test_a_bad_frozen_field_is_refused_naming_it(tmp_path, value):
    file = lorambo.save_adapter(_adapted(), tmp_path / "a.safetensors")
    _rewrite_layers(file, lambda layers: layers["4"].update(frozen=value))
    model = lorambo.configure_model(_base(), 3, capacity=4)
    with pytest.raises(lorambo.AdapterFormatError, match=r"layer '4': field 'frozen' is"):
        lorambo.load_adapter(model, file)
    assert all(layer.rank == 3 and layer.lora_B.requires_grad for layer in lorambo.lora_layers(model).values())


def test_a_model_frozen_whole_is_saved_trainable(tmp_path):
    """model.requires_grad_(False) for inference or export is no training choice: the adapter
    loads trainable, as one saved before (and peft's inference mode converts)."""
    saved = _adapted()
    saved.requires_grad_(False)
    file = lorambo.save_adapter(saved, tmp_path / "a.safetensors")
    model = lorambo.load_adapter(_base(), file)
    assert all(m.lora_A.requires_grad and m.lora_B.requires_grad for m in lorambo.lora_layers(model).values())
