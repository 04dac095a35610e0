"""keep_components stopped by out of memory in one of its gathers (or Ctrl-C) changes nothing:
not the pools, their gradients, the optimizer state, the rank or the layer's output."""

import pytest
import torch
from torch import nn

import lorambo


def _trained_layer():
    torch.manual_seed(0)
    layer = lorambo.LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    opt = lorambo.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    opt.step()
    layer(x).pow(2).sum().backward()  # gradients pending: keep_components runs between backward and step
    return layer, opt, x


def _state(layer, opt):
    pools = {name: (getattr(layer, name).detach().clone(), getattr(layer, name).grad.clone())
             for name in ("lora_A", "lora_B")}
    optim = {name: {k: v.clone() for k, v in opt.state[getattr(layer, name)].items()} for name in ("lora_A", "lora_B")}
    return layer.rank, pools, optim


def _assert_same(a, b):
    assert a[0] == b[0]
    for name in a[1]:
        assert torch.equal(a[1][name][0], b[1][name][0]) and torch.equal(a[1][name][1], b[1][name][1]), name
        assert a[2][name].keys() == b[2][name].keys()
        for k in a[2][name]:
            assert torch.equal(a[2][name][k], b[2][name][k]), (name, k)


def _count_gathers(monkeypatch, fail_at=None):
    calls, real = [], torch.Tensor.index_select

    def index_select(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    return calls


# gathers: A, B, A's and B's gradients, and AdamW's exp_avg, exp_avg_sq and slot_step of each pool
GATHERS = 10


def test_the_layer_gathers_what_it_keeps_in_ten_allocations(monkeypatch):
    layer, opt, _ = _trained_layer()
    calls = _count_gathers(monkeypatch)
    layer.keep_components([2, 0], optimizer=opt)
    assert len(calls) == GATHERS


@pytest.mark.parametrize("k", range(1, GATHERS + 1))
def test_out_of_memory_in_gather_k_changes_nothing(monkeypatch, k):
    """Out of memory in any gather leaves the layer as it was: writing A's kept rows before
    gathering B's columns would leave the same rank holding another adapter."""
    layer, opt, x = _trained_layer()
    expected = layer(x).detach()
    before = _state(layer, opt)
    _count_gathers(monkeypatch, fail_at=k)
    with pytest.raises(torch.OutOfMemoryError):
        layer.keep_components([2, 0], optimizer=opt)
    _assert_same(_state(layer, opt), before)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=0)
    monkeypatch.undo()  # memory freed: the same call succeeds, as on an untouched copy
    layer.keep_components([2, 0], optimizer=opt)
    ref_layer, ref_opt, _ = _trained_layer()  # the same layer, untouched
    ref_layer.keep_components([2, 0], optimizer=ref_opt)
    _assert_same(_state(layer, opt), _state(ref_layer, ref_opt))
