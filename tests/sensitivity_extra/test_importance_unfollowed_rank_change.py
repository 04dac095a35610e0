"""AdaLoRA importance statistics belong to slots. A rank change they were not told about (no
``keep`` / ``reset`` after it) left them at the old slots: a rank move's next decision scored
the component now in slot 1 by the history of the one dropped from it. ``update()`` and
``component_scores()`` now refuse until the tracker follows the change; scores after ``keep``
are those of the kept components (computed from the statistics before the change)."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn import keep_components_many
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance


def _tracked():
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 3, capacity=4)
    gen = torch.Generator().manual_seed(0)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :3] = torch.randn(layer.out_features, 3, generator=gen)
    tracker = AdaLoRAImportance(model)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(9, 6, generator=gen)).square().mean().backward()
        tracker.update()
    return model, lorambo.lora_layers(model), tracker


CHANGES = {
    "keep_components": (lambda layers: layers["1"].keep_components([2, 0]), lambda t: t.keep("1", [2, 0])),
    "keep_components_many": (lambda layers: keep_components_many([(layers["1"], [2, 0])]),
                             lambda t: t.keep("1", [2, 0])),
    "set_rank": (lambda layers: layers["1"].set_rank(1), lambda t: t.reset("1", [1, 2])),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_scores_are_refused_until_the_tracker_follows_the_change(change):
    model, layers, tracker = _tracked()
    before = tracker.component_scores()
    edit, follow = CHANGES[change]
    edit(layers)
    for call in (tracker.component_scores, tracker.update):
        with pytest.raises(RuntimeError, match=r"AdaLoRAImportance\.\w+: the slots of layer '1' \(rank [12] now\).*"
                                               r"importance\.keep\(name, kept\).*importance\.reset\(name, slots\)"):
            call()
    follow(tracker)
    scores = tracker.component_scores()
    torch.testing.assert_close(scores["0"], before["0"], rtol=0, atol=0)
    kept = [2, 0] if change != "set_rank" else [0]
    torch.testing.assert_close(scores["1"], before["1"][kept], rtol=0, atol=0)
    assert bool((scores["1"] > 0).all())
    model.zero_grad()
    model(torch.randn(9, 6)).square().mean().backward()
    tracker.update()  # followed: updates go on


def test_changes_that_keep_every_slot_in_place_need_nothing():
    _, layers, tracker = _tracked()
    before = tracker.component_scores()
    layers["1"].set_rank(3)
    layers["1"].keep_components([0, 1, 2])
    keep_components_many([(layers["0"], [0, 1, 2])])
    scores = tracker.component_scores()  # not refused, and not reset
    assert scores.keys() == before.keys()
    for name in before:
        torch.testing.assert_close(scores[name], before[name], rtol=0, atol=0)
    tracker.update()
