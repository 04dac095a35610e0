"""lorambo.optim.AdamW.load_state_dict converts the per-slot step counts (float32) and float16
parameters' moments (float32) itself, since torch's load would round them to the parameter's
dtype. Those conversions run before torch's load changes anything: a failure in one (out of
memory on the device) leaves the optimizer's state as it was, not loaded with bfloat16 counts."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear


def _stepped(seed):
    torch.manual_seed(seed)
    layer = LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.bfloat16), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    opt = lorambo.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    for _ in range(seed + 1):
        layer(torch.randn(4, 6, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return layer, opt


def _snapshot(opt):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}


def test_a_failed_count_conversion_leaves_the_optimizer_state_as_it_was(monkeypatch):
    _, source = _stepped(2)
    saved = source.state_dict()
    layer, opt = _stepped(0)
    before = _snapshot(opt)
    real_to = torch.Tensor.to

    def failing_to(self, *args, **kwargs):
        if kwargs.get("dtype") is torch.float32 and self.dim() == 1:  # the per-slot counts
            raise torch.OutOfMemoryError("simulated: no memory for the step counts")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    with pytest.raises(torch.OutOfMemoryError):
        opt.load_state_dict(saved)
    monkeypatch.undo()
    after = _snapshot(opt)
    assert after.keys() == before.keys()
    for pid, state in before.items():
        assert after[pid].keys() == state.keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                assert after[pid][key].dtype == value.dtype and torch.equal(after[pid][key], value), key
            else:
                assert after[pid][key] == value, key
    opt.load_state_dict(saved)  # and the load itself works, counts in float32
    assert all(s["slot_step"].dtype == torch.float32 for s in opt.state.values())
