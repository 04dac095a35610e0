"""Loading an adapter (lorambo's file into a plain or adapted model, a peft folder) stopped
part-way, by Ctrl-C / out of memory while the layers are set up or by a user's load hook on a
module to save, leaves the model as it was, or says what it left loaded."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.adapters import overwrite
from lorambo.model.modules_to_save import modules_to_save
from lorambo.nn.frozen_bases import _FROZEN

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 5)
        self.norm, self.head = nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.norm(self.o(self.v(self.q(x)))))


TARGETS, SAVED = ["q", "v", "o"], ["norm", "head"]


def _trained(seed):
    """A Net whose adapters (and modules to save) hold seeded random values."""
    torch.manual_seed(seed)
    model = lorambo.configure_model(Net(), 2, target_modules=TARGETS, modules_to_save=SAVED)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        for layer in lorambo.lora_layers(model).values():
            layer.zero_inactive_()
    return model


def _saved_files(tmp_path):
    source = _trained(0)
    lorambo.save_adapter(source, tmp_path / "lorambo")
    lorambo.export_peft(source, tmp_path / "peft")
    return tmp_path / "lorambo", tmp_path / "peft"


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()}, modules_to_save(model))


def _assert_same(model, snap):
    types, params, buffers, saved = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n].detach(), value) and now[n].requires_grad == flag, n
    for n, value in model.named_buffers():
        assert torch.equal(value, buffers[n]), n
    assert modules_to_save(model) == saved
    if not lorambo.lora_layers(model):  # a plain model: none of its weights on record as a frozen base
        assert not any(p in _FROZEN for p in model.parameters())


def _interrupt_set_up_of_layer(monkeypatch, k):
    calls, real = [], overwrite.set_rank_for_overwrite

    def set_rank_for_overwrite(layer, rank):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(layer, rank)

    monkeypatch.setattr(overwrite, "set_rank_for_overwrite", set_rank_for_overwrite)


def _refusing_load_hook(model):
    """A user's load hook on both modules to save that refuses the second one loaded."""
    loads = []

    def hook(module, state_dict, prefix, *args):
        loads.append(module)
        if len(loads) == 2:
            raise RuntimeError("the head's checkpoint is not for this label set")  # a user's check

    for name in SAVED:
        model.get_submodule(name).register_load_state_dict_pre_hook(hook)
    return loads


def _load(kind, model, files):
    return lorambo.load_adapter(model, files[0]) if kind == "lorambo" else lorambo.import_peft(model, files[1])


@pytest.mark.parametrize("kind", ["lorambo", "peft"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ctrl_c_while_setting_up_layer_k_leaves_the_plain_model(tmp_path, monkeypatch, kind, k):
    """Ctrl-C while giving the k-th layer its rank left the model configured: LoRAMBoLinear
    layers at rank 0 or with throwaway rows, their bases frozen."""
    files = _saved_files(tmp_path)
    torch.manual_seed(1)
    model = Net()
    snap = _snapshot(model)
    _interrupt_set_up_of_layer(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        _load(kind, model, files)
    _assert_same(model, snap)


@pytest.mark.parametrize("kind", ["lorambo", "peft"])
def test_a_refusing_load_hook_on_a_module_to_save_leaves_the_plain_model(tmp_path, kind):
    """The hook of the second module to save raised after the first had loaded the file's
    state: that one kept it, and import_peft left the model configured too."""
    files = _saved_files(tmp_path)
    torch.manual_seed(1)
    model = Net()
    loads = _refusing_load_hook(model)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="not for this label set"):
        _load(kind, model, files)
    assert len(loads) == 2
    _assert_same(model, snap)


def test_a_refusing_load_hook_into_an_adapted_model_keeps_the_modules_and_says_so(tmp_path):
    files = _saved_files(tmp_path)
    model = _trained(1)
    loads = _refusing_load_hook(model)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="not for this label set") as err:
        lorambo.load_adapter(model, files[0])
    assert len(loads) == 2
    assert getattr(err.value, "__notes__", []) == [
        "load_adapter stopped loading the modules to save ['head', 'norm'], which keep their previous state, "
        "after every LoRA layer got the file's adapter. Calling load_adapter again finishes it."]
    source = _trained(0)
    for name, (value, _) in snap[1].items():
        now = model.get_parameter(name)
        want = source.get_parameter(name) if name.endswith((".lora_A", ".lora_B")) else value
        assert torch.equal(now.detach(), want.detach()), name
