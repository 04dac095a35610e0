"""unload stopped part-way (out of memory in one layer's merge, Ctrl-C) says which layers it
finished, and calling it again finishes the job exactly as an uninterrupted unload."""

import copy

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn import merging


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    lorambo.configure_model(model, 2)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    return model


def _fail_at(monkeypatch, k: int, fault):
    calls, real = [], merging.finite_merge

    def finite_merge(*args, **kwargs):  # where a merge allocates its float64 temporaries
        calls.append(1)
        if len(calls) == k:
            raise fault("out of memory while merging") if fault is not KeyboardInterrupt else fault
        return real(*args, **kwargs)

    monkeypatch.setattr(merging, "finite_merge", finite_merge)


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_unload_stopped_at_layer_k_names_what_it_finished(monkeypatch, fault, k):
    """Stopped at the second layer, unload left the first a plain Linear with the adapter merged
    and the others LoRAMBoLinear, and said nothing about it."""
    model, reference = _model(), _model()
    lorambo.unload(reference)
    names = list(lorambo.lora_layers(model))
    before = copy.deepcopy(model)
    _fail_at(monkeypatch, k, fault)
    with pytest.raises(fault) as err:
        lorambo.unload(model)
    notes = getattr(err.value, "__notes__", [])
    if k == 1:  # nothing was done: the model is as it was, and the error needs no note
        assert notes == []
        for (n, p), (_, q) in zip(model.state_dict(keep_vars=True).items(), before.state_dict(keep_vars=True).items()):
            assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n
    else:
        assert notes == [f"unload(merge=True) stopped at {names[k - 1]!r}, after {k - 1} of the layers: "
                         f"{names[:k - 1]} are plain modules again with their adapters merged, the others still "
                         "LoRAMBoLinear layers. Calling unload(merge=True) again finishes it."]
    assert [type(model[int(n)]) for n in names] == [nn.Linear] * (k - 1) + [lorambo.LoRAMBoLinear] * (4 - k)
    monkeypatch.undo()
    lorambo.unload(model)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad and q.requires_grad, n
