"""load_adapter into an adapted model, stopped part-way (out of memory unmerging a merged layer,
Ctrl-C), says which layers hold the file already; loading again finishes the job."""

import copy

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn import lora_linear

NAMES = ["0", "1", "2"]


def _model(seed: int, rank: int) -> nn.Module:
    torch.manual_seed(seed)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 7), nn.Linear(7, 4)), rank,
                                    capacity=4)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :rank].normal_()
    return model


def _fail_at(monkeypatch, k: int, fault):
    calls, real = [], lora_linear.LoRAMBoLinear._delta_as_base_layout

    def delta(self):  # the float64 delta an unmerge without a kept weight allocates
        calls.append(1)
        if len(calls) == k:
            raise fault("out of memory while unmerging") if fault is not KeyboardInterrupt else fault
        return real(self)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "_delta_as_base_layout", delta)


def _assert_layer(layer, want):
    assert (layer.rank, layer.merged, layer.scaling) == (want.rank, want.merged, want.scaling)
    for name in ("lora_A", "lora_B"):
        assert torch.equal(getattr(layer, name), getattr(want, name)), name
    assert torch.equal(layer.base_layer.weight, want.base_layer.weight)


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_stopped_at_layer_k_names_what_it_finished(tmp_path, monkeypatch, fault, k):
    """Stopped at the second layer, the first held the file's adapter and the others their own,
    and the error said nothing of it."""
    source = _model(0, 2)
    lorambo.save_adapter(source, tmp_path)
    model = _model(1, 3)
    for layer in lorambo.lora_layers(model).values():
        layer.merge(exact=False)  # served merged; loading unmerges each layer first
    before = copy.deepcopy(model)
    _fail_at(monkeypatch, k, fault)
    with pytest.raises(fault) as err:
        lorambo.load_adapter(model, tmp_path)
    notes = getattr(err.value, "__notes__", [])
    assert notes == ([] if k == 1 else [
        f"load_adapter stopped at {NAMES[k - 1]!r}, after {k - 1} of the layers: {NAMES[:k - 1]} hold the file's "
        "adapter, the others their previous one. Calling load_adapter again finishes it."])
    for i, name in enumerate(NAMES):
        if i >= k - 1:  # not reached, or stopped in its unmerge: as it was
            _assert_layer(model.get_submodule(name), before.get_submodule(name))
        else:
            _assert_loaded(model.get_submodule(name), source.get_submodule(name))
    monkeypatch.undo()
    lorambo.load_adapter(model, tmp_path)
    for name in NAMES:
        _assert_loaded(model.get_submodule(name), source.get_submodule(name))


def _assert_loaded(layer, saved):
    assert (layer.rank, layer.merged, layer.scaling) == (2, False, saved.scaling)
    assert torch.equal(layer.lora_A, saved.lora_A) and torch.equal(layer.lora_B, saved.lora_B)
