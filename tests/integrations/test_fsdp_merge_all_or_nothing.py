"""``lorambo.integrations.fsdp.merge`` / ``unmerge`` (on an unsharded model, the per-layer calls)
change every layer or none: with one layer already in the target state they used to merge (or
unmerge) the layers before it and then raise there, leaving the model half merged."""

import pytest
import torch
from torch import nn

from lorambo import configure_model, lora_layers
from lorambo.integrations import fsdp


def _model():
    model = configure_model(nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)),
                            2, capacity=4, alpha=3.0).double()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].normal_()
    return model


def _state(model):
    return ([layer.merged for layer in lora_layers(model).values()],
            [layer.base_layer.weight.detach().clone() for layer in lora_layers(model).values()])


@pytest.mark.parametrize("call, merged_first, match", [
    (fsdp.merge, ["2"], r"^merge: LoRA layers \['2'\] are merged already; nothing was changed"),
    (fsdp.unmerge, ["2"], r"^unmerge: LoRA layers \['0', '4'\] are not merged; nothing was changed"),
])
def test_a_layer_already_in_the_target_state_is_refused_before_any_change(call, merged_first, match):
    model = _model()
    for name in merged_first:
        lora_layers(model)[name].merge()
    flags, weights = _state(model)
    with pytest.raises(RuntimeError, match=match):
        call(model)
    after_flags, after_weights = _state(model)
    assert after_flags == flags
    assert all(torch.equal(a, b) for a, b in zip(after_weights, weights))


def test_merge_then_unmerge_of_every_layer():
    model = _model()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        weights = [layer.base_layer.weight.detach().clone() for layer in lora_layers(model).values()]
        deltas = [layer.scaling * layer.lora_B[:, :2] @ layer.lora_A[:2] for layer in lora_layers(model).values()]
        fsdp.merge(model, exact=True)
        for layer, w, d in zip(lora_layers(model).values(), weights, deltas):
            assert layer.merged
            torch.testing.assert_close(layer.base_layer.weight, w + d, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
        fsdp.unmerge(model)
        assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(lora_layers(model).values(), weights))


def _fail_at(monkeypatch, target, name, k, fault):
    calls, real = [], getattr(target, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise fault("out of memory") if fault is not KeyboardInterrupt else fault
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("exact", [True, False])
def test_a_merge_stopped_at_layer_k_is_taken_back(monkeypatch, fault, k, exact):
    """Out of memory in the third layer's merge left two layers merged, and then merge refused
    ('merged already') and so did unmerge ('not merged'): the model stayed half merged."""
    from lorambo.nn import merging

    model = _model()
    flags, weights = _state(model)
    deltas = [(layer.scaling * layer.lora_B[:, :2] @ layer.lora_A[:2]).detach() for layer in lora_layers(model).values()]
    _fail_at(monkeypatch, merging, "finite_merge", k, fault)  # the float64 merged weight
    with pytest.raises(fault) as err:
        fsdp.merge(model, exact=exact)
    names = list(lora_layers(model))
    assert getattr(err.value, "__notes__", []) == ([] if k == 1 else [
        f"merge stopped at {names[k - 1]!r}; the layers before it {names[:k - 1]} were unmerged again"
        + ("" if exact else " (each weight within two roundings of its own)")])
    after_flags, after_weights = _state(model)
    assert after_flags == flags == [False] * 3
    for a, b, d in zip(after_weights, weights, deltas):
        if exact:
            assert torch.equal(a, b)
        else:  # merge(exact=False) then unmerge: two roundings, |w' - w| <= 2u max(|w|, |w + d|)
            assert bool(((a - b).abs() <= 2 * 2.0 ** -53 * torch.maximum(b.abs(), (b + d).abs())).all())
    monkeypatch.undo()
    fsdp.merge(model, exact=exact)  # nothing stands in the way of a second try
    assert _state(model)[0] == [True] * 3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_unmerge_stopped_at_layer_k_is_taken_back(monkeypatch, k):
    model = _model()
    original = _state(model)[1]
    fsdp.merge(model, exact=True)
    flags, weights = _state(model)
    _fail_at(monkeypatch, lorambo_linear(), "_unmerged_weight", k, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError) as err:
        fsdp.unmerge(model)
    names = list(lora_layers(model))
    assert getattr(err.value, "__notes__", []) == ([] if k == 1 else [
        f"unmerge stopped at {names[k - 1]!r}; the layers before it {names[:k - 1]} were merged again"])
    after_flags, after_weights = _state(model)
    assert after_flags == flags == [True] * 3
    assert all(torch.equal(a, b) for a, b in zip(after_weights, weights))
    monkeypatch.undo()
    fsdp.unmerge(model)  # the kept weights came back too: the original weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(_state(model)[1], original))


def lorambo_linear():
    from lorambo.nn.lora_linear import LoRAMBoLinear

    return LoRAMBoLinear


def test_the_note_of_a_merge_stopped_after_more_than_six_layers_ends_with_dots(monkeypatch):
    """Its note cut the layers done to six without saying so (the layer notes elsewhere, from
    lorambo.model.partial_edit, add "..."); it now shows the first six and "...", as they do."""
    from lorambo.nn import merging

    torch.manual_seed(0)
    model = configure_model(nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)]), 1, capacity=2).double()
    _fail_at(monkeypatch, merging, "finite_merge", 8, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError) as err:
        fsdp.merge(model, exact=True)
    assert err.value.__notes__ == ["merge stopped at '7'; the layers before it ['0', '1', '2', '3', '4', '5', '...'] "
                                   "were unmerged again"]
    assert [layer.merged for layer in lora_layers(model).values()] == [False] * 9
