"""AdaLoRAImportance.update() runs at every optimizer step; leaving out a step with non-finite
gradients must not read the device from the host there (on CUDA each read waits for the whole
backward, and the host no longer runs ahead of the GPU). It read one flag per step and device
(``bool(...)``); the test counts every host read of a tensor during update() and checks the
statistics against a float64 oracle that skips the overflowed step."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.sensitivity import AdaLoRAImportance

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


def _counting_reads(monkeypatch):
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


def test_update_reads_nothing_from_the_device_and_skips_a_non_finite_step(monkeypatch):
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 3, capacity=4)
    gen = torch.Generator().manual_seed(7)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :3].normal_(generator=gen)
    tracker = AdaLoRAImportance(model, beta1=0.8, beta2=0.7)
    ibar, ubar, answers = {}, {}, []
    for step in range(4):
        model.zero_grad()
        model(torch.randn(9, 6, generator=gen)).pow(2).mean().backward()
        if step == 1:  # one entry of one layer's gradient overflowed
            lorambo.lora_layers(model)["1"].lora_B.grad[2, 1] = float("inf")
        reads = _counting_reads(monkeypatch)
        answers.append(tracker.update())
        monkeypatch.undo()
        assert reads == [], f"update() read the device {len(reads)} times: {reads}"
        if step == 1:
            continue
        for name, layer in lorambo.lora_layers(model).items():
            for which in "AB":
                p = getattr(layer, "lora_" + which)
                inst = (p.detach().double() * p.grad.double()).abs()  # float64 oracle
                key = (name, which)
                ibar[key] = 0.8 * ibar.get(key, torch.zeros_like(inst)) + 0.2 * inst
                ubar[key] = 0.7 * ubar.get(key, torch.zeros_like(inst)) + 0.3 * (inst - ibar[key]).abs()
    assert [bool(a) for a in answers] == [True, False, True, True]
    assert (tracker.steps, tracker.skipped_steps) == (3, 1)
    state = tracker.state_dict()
    assert (state["steps"], state["skipped_steps"]) == (3, 1)
    for key in ibar:
        torch.testing.assert_close(state["ibar"][key].double(), ibar[key], rtol=1e-5, atol=0)
        torch.testing.assert_close(state["ubar"][key].double(), ubar[key], rtol=1e-5, atol=1e-12)
    assert all(torch.isfinite(t).all() for t in [*state["ibar"].values(), *state["ubar"].values()])


@pytest.mark.parametrize("first_finite", [False, True])
def test_a_rank_change_after_only_skipped_steps_is_followed_as_before(first_finite):
    """A tracker that has folded nothing in holds no statistics of the old slots: a rank change
    then needs no keep()/reset(), also when its only update() was left out."""
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5)), 2, capacity=4)
    tracker = AdaLoRAImportance(model)
    loss = model(torch.randn(3, 6)).pow(2).mean()
    (loss if first_finite else loss * float("inf")).backward()
    tracker.update()
    lorambo.lora_layers(model)["0"].set_rank(3)
    model.zero_grad()
    model(torch.randn(3, 6)).pow(2).mean().backward()
    if first_finite:
        with pytest.raises(RuntimeError, match="were changed"):
            tracker.update()
    else:
        assert bool(tracker.update())
        assert (tracker.steps, tracker.skipped_steps) == (1, 1)
