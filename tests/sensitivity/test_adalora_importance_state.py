"""AdaLoRAImportance.state_dict / load_state_dict: a plain loop whose rank moves are scored by
AdaLoRA importance resumes with the same running averages (before, only the Trainer callback
could save them, by reading private attributes, and loaded them unchecked)."""

import pytest
import torch
from torch import nn

from lorambo import configure_model
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

DT = torch.float64


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 4, dtype=DT))
    configure_model(model, {"0": 2, "2": 3}, capacity=4)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    return model


def _update(model, tracker, seed):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, 6, generator=g, dtype=DT)).pow(2).mean().backward()
    tracker.update()


def test_round_trip_continues_like_the_uninterrupted_tracker(tmp_path):
    model = _model()
    ref = AdaLoRAImportance(model)
    for s in range(5):
        _update(model, ref, s)
    want = ref.component_scores()

    tracker = AdaLoRAImportance(model)
    for s in range(3):
        _update(model, tracker, s)
    torch.save(tracker.state_dict(), tmp_path / "imp.pt")
    fresh = AdaLoRAImportance(model)
    fresh.load_state_dict(torch.load(tmp_path / "imp.pt", weights_only=True))
    for s in range(3, 5):
        _update(model, fresh, s)
    got = fresh.component_scores()
    assert fresh.steps == ref.steps == 5
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("edit,message", [
    (lambda st: st["ibar"].update({("9", "A"): st["ibar"][("0", "A")]}), r"ibar entry \('9', 'A'\) is not a tracked pool"),
    (lambda st: st["ubar"].update({("0", "B"): torch.zeros(10, 3)}), r"ubar\[\('0', 'B'\)\] has shape \[10, 3\], the pool has \[10, 4\]"),
    (lambda st: st.update(steps=-1), r"steps=-1 must be an int >= 0"),
])
def test_statistics_of_another_model_are_refused_before_anything_changes(edit, message):
    model = _model()
    tracker = AdaLoRAImportance(model)
    _update(model, tracker, 0)
    state = tracker.state_dict()
    edit(state)
    if ("9", "A") in state["ibar"]:
        state["ubar"][("9", "A")] = state["ibar"][("9", "A")]
    other = AdaLoRAImportance(model)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)
    assert other.steps == 0 and other._ibar == {} and other._ubar == {}


@pytest.mark.parametrize("k", [1, 4, 8])  # the first, a middle, the last of the 8 statistics moved to the pools' device
def test_out_of_memory_moving_the_statistics_loads_nothing(monkeypatch, k):
    """Out of memory moving the second table's tensors to the pools' device left the first table
    (and the step count) of the checkpoint beside the second of the tracker: mixed statistics."""
    model = _model()
    saved = AdaLoRAImportance(model)
    for s in range(3):
        _update(model, saved, s)
    tracker = AdaLoRAImportance(model)
    _update(model, tracker, 7)
    before = tracker.state_dict()
    calls, real = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, *args, **kwargs)

    state = saved.state_dict()
    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(torch.OutOfMemoryError):
        tracker.load_state_dict(state)
    monkeypatch.undo()
    assert len(calls) == k
    after = tracker.state_dict()
    assert after["steps"] == before["steps"] == 1
    for table in ("ibar", "ubar"):
        for key, value in before[table].items():
            assert torch.equal(after[table][key], value), (table, key)
    tracker.load_state_dict(state)  # memory freed
    assert tracker.steps == 3
