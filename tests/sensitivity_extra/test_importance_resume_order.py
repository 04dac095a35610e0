"""Loading the project's own checkpoint is no edit of the slots: a ``load_state_dict`` that brings
back the components a layer holds leaves ``slot_edits`` as it was (one that brings others counts
one), and AdaLoRA importance statistics resumed from ``torch.save``d state_dicts go on whether
they are loaded before or after the model. The scores are checked against the AdaLoRA recursion
by hand in float64 over the whole run."""

import io

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

BETA1, BETA2 = 0.8, 0.7


def _model(seed):
    torch.manual_seed(seed)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double(), 2, capacity=4)
    gen = torch.Generator().manual_seed(seed)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :2] = torch.randn(layer.out_features, 2, generator=gen, dtype=torch.float64)
    return model


def _backward(model, x):
    model.zero_grad()
    model(x).square().mean().backward()


class _Reference:
    """The AdaLoRA recursion of every pool entry, by hand in float64."""

    def __init__(self):
        self.ibar, self.ubar = {}, {}

    def update(self, model):
        for name, layer in lorambo.lora_layers(model).items():
            for which in "AB":
                p = getattr(layer, "lora_" + which)
                inst = (p.detach() * p.grad).abs()
                key = (name, which)
                self.ibar[key] = BETA1 * self.ibar.get(key, torch.zeros_like(inst)) + (1 - BETA1) * inst
                self.ubar[key] = (BETA2 * self.ubar.get(key, torch.zeros_like(inst))
                                  + (1 - BETA2) * (inst - self.ibar[key]).abs())

    def check(self, tracker, model):
        scores = tracker.component_scores()
        for name, layer in lorambo.lora_layers(model).items():
            s_a, s_b = (self.ibar[(name, w)] * self.ubar[(name, w)] for w in "AB")
            want = s_a[:layer.rank].mean(1) + s_b[:, :layer.rank].mean(0)
            torch.testing.assert_close(scores[name], want, rtol=1e-5, atol=1e-14)


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_loading_a_layers_own_state_dict_is_no_edit():
    model = _model(0)
    layers = lorambo.lora_layers(model)
    edits = {name: layer.slot_edits for name, layer in layers.items()}
    tracker, ref = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2), _Reference()
    xs = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for x in xs[:2]:
        _backward(model, x)
        tracker.update()
        ref.update(model)
    model.load_state_dict(_round_trip(model.state_dict()))  # the same components, back from a checkpoint
    assert {name: layer.slot_edits for name, layer in layers.items()} == edits
    for x in xs[2:]:
        _backward(model, x)
        tracker.update()  # the statistics still belong to these components
        ref.update(model)
    ref.check(tracker, model)


def test_loading_other_components_counts_one_edit_and_the_tracker_still_refuses():
    model = _model(0)
    layers = lorambo.lora_layers(model)
    edits = {name: layer.slot_edits for name, layer in layers.items()}
    tracker = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2)
    _backward(model, torch.randn(9, 6, dtype=torch.float64))
    tracker.update()
    model.load_state_dict(_round_trip(_model(7).state_dict()))
    assert {name: layer.slot_edits for name, layer in layers.items()} == {n: e + 1 for n, e in edits.items()}
    with pytest.raises(RuntimeError, match="the slots of layer '0'"):
        tracker.update()


@pytest.mark.parametrize("tracker_first", [True, False])
def test_statistics_resume_in_either_load_order(tracker_first):
    xs = torch.randn(5, 9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _model(0)
    tracker, ref = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2), _Reference()
    for x in xs[:3]:
        _backward(model, x)
        tracker.update()
        ref.update(model)
    lorambo.lora_layers(model)["1"].keep_components([1, 0])  # the saved slots moved once, and followed
    tracker.keep("1", [1, 0])
    for key in (("1", "A"), ("1", "B")):
        ref.ibar[key], ref.ubar[key] = (t.index_select(0 if key[1] == "A" else 1, torch.tensor([1, 0, 2, 3]))
                                        for t in (ref.ibar[key], ref.ubar[key]))
    saved_model, saved_tracker = _round_trip(model.state_dict()), _round_trip(tracker.state_dict())

    resumed = _model(3)  # a new process's model: other components until the checkpoint is loaded
    resumed_tracker = AdaLoRAImportance(resumed, beta1=BETA1, beta2=BETA2)
    if tracker_first:
        resumed_tracker.load_state_dict(saved_tracker)
        resumed.load_state_dict(saved_model)
    else:
        resumed.load_state_dict(saved_model)
        resumed_tracker.load_state_dict(saved_tracker)
    for x in xs[3:]:
        _backward(resumed, x)
        resumed_tracker.update()
        ref.update(resumed)
    ref.check(resumed_tracker, resumed)


def test_statistics_loaded_before_a_model_without_its_component_ids_are_refused():
    """A model loaded from a state_dict without the ids (a filtered one, safetensors) holds new
    components as far as anyone can tell: the statistics cannot be matched to them."""
    model = _model(0)
    tracker = AdaLoRAImportance(model, beta1=BETA1, beta2=BETA2)
    _backward(model, torch.randn(9, 6, dtype=torch.float64))
    tracker.update()
    plain = dict(model.state_dict())  # a plain dict: no metadata, so no ids
    resumed = _model(3)
    resumed_tracker = AdaLoRAImportance(resumed, beta1=BETA1, beta2=BETA2)
    resumed_tracker.load_state_dict(_round_trip(tracker.state_dict()))
    resumed.load_state_dict(plain)
    _backward(resumed, torch.randn(9, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="the slots of layer '0'"):
        resumed_tracker.update()


def test_saved_slot_ids_of_an_untracked_layer_are_refused():
    model = _model(0)
    tracker = AdaLoRAImportance(model)
    state = tracker.state_dict()
    state["slot_ids"]["2"] = [0, 1, -1, -1]
    with pytest.raises(ValueError, match="slot_ids entry '2' is not a tracked layer"):
        tracker.load_state_dict(state)
    state["slot_ids"] = {"0": [0, 1]}
    with pytest.raises(ValueError, match=r"slot_ids\['0'\] must be 4 ints"):
        tracker.load_state_dict(state)
