"""AdaLoRAImportance.state_dict keeps skipped_steps (update() calls left out for non-finite
gradients): a resumed tracker counted them from 0 again, so its skipped_steps and the message of
component_scores() before any folded update differed from the tracker that never stopped."""

import pytest
import torch
from torch import nn

from lorambo import configure_model
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    return configure_model(model, {"0": 2, "2": 3}, capacity=4)


def _update(model, tracker, seed, overflow=False):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
    if overflow:  # what a GradScaler step that overflowed leaves in the gradients
        model[0].lora_A.grad[0, 0] = float("inf")
    return tracker.update()


@pytest.mark.parametrize("saved_after", [1, 3])  # only the overflowed step; then two folded ones too
def test_skipped_steps_survive_a_resume(tmp_path, saved_after):
    model = _model()
    ref = AdaLoRAImportance(model)
    assert [_update(model, ref, s, overflow=s == 0) for s in range(5)] == [False, True, True, True, True]

    tracker = AdaLoRAImportance(model)
    for s in range(saved_after):
        _update(model, tracker, s, overflow=s == 0)
    torch.save(tracker.state_dict(), tmp_path / "imp.pt")
    fresh = AdaLoRAImportance(model)
    fresh.load_state_dict(torch.load(tmp_path / "imp.pt", weights_only=True))
    if saved_after == 1:  # nothing folded in yet: the error names the step left out, as the saved tracker's does
        with pytest.raises(RuntimeError, match=r"no update\(\) yet \(1 left out"):
            fresh.component_scores()
    for s in range(saved_after, 5):
        _update(model, fresh, s)
    assert (fresh.steps, fresh.skipped_steps) == (ref.steps, ref.skipped_steps) == (4, 1)


def test_a_state_saved_without_skipped_steps_loads_as_none_skipped():
    model = _model()
    tracker = AdaLoRAImportance(model)
    _update(model, tracker, 0, overflow=True)
    _update(model, tracker, 1)
    state = tracker.state_dict()
    del state["skipped_steps"]
    fresh = AdaLoRAImportance(model)
    fresh.load_state_dict(state)
    assert (fresh.steps, fresh.skipped_steps) == (1, 0)


def test_a_bad_skipped_steps_is_refused_before_anything_changes():
    model = _model()
    tracker = AdaLoRAImportance(model)
    _update(model, tracker, 0)
    state = dict(tracker.state_dict(), skipped_steps=-2)
    fresh = AdaLoRAImportance(model)
    with pytest.raises(ValueError, match=r"skipped_steps=-2 must be an int >= 0"):
        fresh.load_state_dict(state)
    assert (fresh.steps, fresh.skipped_steps, fresh._ibar) == (0, 0, {})
