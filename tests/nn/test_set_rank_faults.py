"""set_rank(r, optimizer=...) stopped by out of memory (or Ctrl-C) while it prepares the reset of
the changed slots' optimizer state changes nothing: not the rank, the pools, their gradients,
the optimizer state, the slot ids or the output, so calling it again does the whole edit."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.nn.slot_lineage import slot_ids


def _trained_layer(make_opt, rank):
    torch.manual_seed(0)
    layer = lorambo.LoRAMBoLinear(nn.Linear(6, 5, dtype=torch.float64), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B[:, :3].normal_()
    opt = make_opt(layer.parameters())
    x = torch.randn(4, 6, dtype=torch.float64)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        opt.step()
    layer.set_rank(rank, optimizer=opt)
    layer(x).pow(2).sum().backward()  # gradients pending: the rank changes between backward and step
    return layer, opt, x


def _state(layer, opt):
    pools = {name: (getattr(layer, name).detach().clone(), getattr(layer, name).grad.clone())
             for name in ("lora_A", "lora_B")}
    optim = {name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[getattr(layer, name)].items()}
             for name in ("lora_A", "lora_B")}
    return layer.rank, pools, optim, list(slot_ids(layer)), layer.slot_edits


def _assert_same(a, b, same_ids=True):
    assert a[0] == b[0]
    for name in a[1]:
        assert torch.equal(a[1][name][0], b[1][name][0]) and torch.equal(a[1][name][1], b[1][name][1]), name
        assert a[2][name].keys() == b[2][name].keys()
        for k in a[2][name]:
            va, vb = a[2][name][k], b[2][name][k]
            assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), (name, k)
    if same_ids:  # a new component gets a new id: two layers grown apart differ there
        assert a[3] == b[3] and a[4] == b[4]


OPTIMIZERS = {
    "lorambo AdamW": lambda p: lorambo.optim.AdamW(p, lr=1e-2),
    "torch Adam": lambda p: torch.optim.Adam(p, lr=1e-2),  # growth from 0 restarts its step
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),  # new slots start at the step size lr
}
# (rank before, rank after): growth, growth from 0, shrinking
CHANGES = [(1, 3), (0, 2), (3, 1)]


@pytest.mark.filterwarnings("ignore:Adam keeps one step count per parameter")
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                                   KeyboardInterrupt()])
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_failure_preparing_the_state_reset_changes_nothing(monkeypatch, kind, change, error):
    before_rank, after_rank = change
    layer, opt, x = _trained_layer(OPTIMIZERS[kind], before_rank)
    expected = layer(x).detach()
    before = _state(layer, opt)
    real = torch.as_tensor

    def failing(*args, **kwargs):  # the slot index the reset fills through: an allocation
        raise error

    monkeypatch.setattr(torch, "as_tensor", failing)
    with pytest.raises(type(error)):
        layer.set_rank(after_rank, optimizer=opt)
    monkeypatch.setattr(torch, "as_tensor", real)
    _assert_same(_state(layer, opt), before)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=0)

    gen = torch.Generator().manual_seed(5)
    layer.set_rank(after_rank, optimizer=opt, generator=gen)  # the retry does the whole edit
    ref_layer, ref_opt, _ = _trained_layer(OPTIMIZERS[kind], before_rank)  # the same layer, untouched
    ref_layer.set_rank(after_rank, optimizer=ref_opt, generator=torch.Generator().manual_seed(5))
    _assert_same(_state(layer, opt), _state(ref_layer, ref_opt), same_ids=False)
    assert layer.rank == after_rank
