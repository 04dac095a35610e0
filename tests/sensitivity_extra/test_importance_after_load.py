"""AdaLoRA importance statistics belong to the components in the slots. A load of the pools
(``load_state_dict``, with or without a new rank; ``load_adapter`` at the same rank) or
``reset_parameters`` puts new components there and counts in ``layer.slot_edits``, so the
tracker refuses to score them by the EMAs of the components they replaced until told; after
``reset`` its scores are those of the AdaLoRA recursion started on the new components (float64
reference by hand)."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

BETA1, BETA2 = 0.8, 0.7


def _model(rank, seed):
    torch.manual_seed(seed)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double(), rank, capacity=4)
    gen = torch.Generator().manual_seed(seed)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :rank] = torch.randn(layer.out_features, rank, generator=gen, dtype=torch.float64)
    return model


def _backward(model, gen):
    model.zero_grad()
    model(torch.randn(9, 6, generator=gen, dtype=torch.float64)).square().mean().backward()


def _save_adapter(model, tmp_path):
    return lorambo.save_adapter(model, tmp_path / "adapter.safetensors")


EDITS = {
    "load_state_dict of another rank": lambda model, tmp: model.load_state_dict(_model(3, 7).state_dict()),
    "load_state_dict of the same rank": lambda model, tmp: model.load_state_dict(_model(2, 7).state_dict()),
    "reset_parameters": lambda model, tmp: lorambo.lora_layers(model)["1"].reset_parameters(),
    "load_adapter of the same rank": lambda model, tmp: lorambo.load_adapter(model, _save_adapter(_model(2, 7), tmp)),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_new_components_are_scored_from_their_own_history(edit, tmp_path):
    model = _model(2, 0)
    gen = torch.Generator().manual_seed(1)
    tracker = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2)
    for _ in range(2):
        _backward(model, gen)
        tracker.update()
    EDITS[edit](model, tmp_path)
    layers = lorambo.lora_layers(model)
    changed = ["0", "1"] if edit != "reset_parameters" else ["1"]
    _backward(model, gen)
    with pytest.raises(RuntimeError, match=rf"the slots of layer '{changed[0]}' \(rank \d now\).*range\(layer\.capacity\)"):
        tracker.update()
    for name in changed:
        tracker.reset(name, range(layers[name].capacity))
    ibar, ubar = {}, {}
    for _ in range(2):
        tracker.update()
        for name in changed:  # the recursion from zero, on the new components only
            for which in "AB":
                p = getattr(layers[name], "lora_" + which)
                inst = (p.detach() * p.grad).abs()
                key = (name, which)
                ibar[key] = BETA1 * ibar.get(key, torch.zeros_like(inst)) + (1 - BETA1) * inst
                ubar[key] = BETA2 * ubar.get(key, torch.zeros_like(inst)) + (1 - BETA2) * (inst - ibar[key]).abs()
        _backward(model, gen)
    scores = tracker.component_scores()
    for name in changed:
        rank = layers[name].rank
        s_a, s_b = (ibar[(name, w)] * ubar[(name, w)] for w in "AB")
        got_a, got_b = tracker.parameter_scores(name)
        torch.testing.assert_close(got_a.double(), s_a, rtol=1e-5, atol=1e-14)
        torch.testing.assert_close(got_b.double(), s_b, rtol=1e-5, atol=1e-14)
        want = s_a[:rank].mean(1) + s_b[:, :rank].mean(0)
        torch.testing.assert_close(scores[name], want, rtol=1e-5, atol=1e-14)
        assert scores[name].shape == (rank,)
        # reset_parameters leaves B = 0: no component has a nonzero |theta * grad| yet
        assert bool((scores[name] > 0).all()) == (edit != "reset_parameters")


@pytest.mark.parametrize("edit", list(EDITS) + ["set_rank"])
def test_a_tracker_without_statistics_follows_edits_made_before_its_first_update(edit, tmp_path):
    """The usual order: build the tracker, load the weights to go on from, train. Nothing was
    measured for the old slots, so nothing can be stale: no error, the recursion starts on the new ones."""
    model = _model(2, 0)
    tracker = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2)
    if edit == "set_rank":
        lorambo.lora_layers(model)["1"].set_rank(3)
    else:
        EDITS[edit](model, tmp_path)
    gen = torch.Generator().manual_seed(1)
    _backward(model, gen)
    tracker.update()
    for name, layer in lorambo.lora_layers(model).items():
        got_a, got_b = tracker.parameter_scores(name)
        for got, which in ((got_a, "A"), (got_b, "B")):
            p = getattr(layer, "lora_" + which)
            inst = (p.detach() * p.grad).abs()  # one step from zero: Ibar = (1-b1) I, Ubar = (1-b2) b1 I
            want = (1 - BETA1) * inst * (1 - BETA2) * BETA1 * inst
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-14)
