"""Snapshot a model's state (parameters, buffers, training flags, hook counts, requires_grad,
.grad, grad mode, torch's RNG state) and assert that a call left all of it bit-for-bit unchanged."""

import torch


def snapshot(model):
    return {"state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "training": [m.training for m in model.modules()],
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                       len(m._backward_pre_hooks)) for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "grad_enabled": torch.is_grad_enabled(), "rng": torch.get_rng_state()}


def assert_same(before, after):
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["grad_enabled"] == after["grad_enabled"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for a, b in zip(before["grad"], after["grad"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
