"""configure_model interrupted midway (Ctrl-C, out of memory) leaves the model as it was."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo import configure_model
from lorambo.nn import lora_linear
from lorambo.nn.frozen_bases import _FROZEN


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same(model, snap):
    types, params = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n].detach(), value), n
        assert now[n].requires_grad == flag, n
    # nor are its weights on record as frozen adapter bases (an optimizer of them would be warned about)
    assert not any(p in _FROZEN for p in model.parameters())


@pytest.mark.parametrize("frozen_first", [False, True])
@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("k", [1, 2, 3])  # building the first, middle, last layer
def test_a_fault_while_building_layer_k_leaves_the_model_as_it_was(monkeypatch, fault, k, frozen_first):
    """Ctrl-C or out of memory while building layer k leaves every weight and requires_grad flag
    as it was (a cleanup for Exception only would leave the built layers' base weights frozen, so
    the plain model would not train them), and in a model frozen beforehand (the usual start) the
    weights of the layer being built are not left on record as an adapter's frozen base."""
    model = _model()
    if frozen_first:
        model.requires_grad_(False)
    x = torch.randn(3, 6)
    expected = model(x)
    snap = _snapshot(model)
    built, init = [], lora_linear.LoRAMBoLinear.__init__

    def failing_init(self, *args, **kwargs):
        built.append(1)
        if len(built) == k:
            init(self, *args, **kwargs)  # the base is frozen by now: fail after that
            raise fault
        init(self, *args, **kwargs)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "__init__", failing_init)
    with pytest.raises(fault):
        configure_model(model, 2)
    assert len(built) == k
    _assert_same(model, snap)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


@pytest.mark.parametrize("fault", [KeyboardInterrupt, torch.OutOfMemoryError])
@pytest.mark.parametrize("k", [1, 2, 3])  # re-ranking the first, middle, last existing adapter
def test_a_fault_while_re_ranking_adapter_k_places_no_new_layer_and_names_the_re_ranked(monkeypatch, fault, k):
    """Stopped while re-ranking an adapter, configure_model had already placed the new layer
    (o) and re-ranked the adapters before it, and said nothing of either."""
    torch.manual_seed(0)
    model = configure_model(Attn(), {"q": 2, "k": 2, "v": 2}, capacity=5)
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 6)
    model(x).pow(2).sum().backward()
    opt.step()
    snap = _snapshot(model)
    calls, real = [], lora_linear.LoRAMBoLinear.set_rank
    existing = {id(model.q), id(model.k), id(model.v)}  # not the set_rank of a new layer's constructor

    def set_rank(self, *args, **kwargs):
        calls.append(1) if id(self) in existing else None
        if id(self) in existing and len(calls) == k:
            raise fault("out of memory") if fault is not KeyboardInterrupt else fault
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "set_rank", set_rank)
    with pytest.raises(fault) as err:
        configure_model(model, {"q": 3, "k": 3, "v": 3, "o": 2}, optimizer=opt)
    names = ["q", "k", "v"]
    assert getattr(err.value, "__notes__", []) == ([] if k == 1 else [
        f"configure_model stopped at {names[k - 1]!r}, after {k - 1} of the layers: {names[:k - 1]} have their new "
        "ranks, the others their old ones, and no new adapter was placed. Calling configure_model again finishes it."])
    assert type(model.o) is nn.Linear and not any(p in _FROZEN for p in model.o.parameters())
    assert [getattr(model, n).rank for n in names] == [3] * (k - 1) + [2] * (4 - k)
    types, params = snap
    for n, (value, flag) in params.items():  # the layers not re-ranked, and the rest of the model, as they were
        if n.split(".")[0] not in names[:k - 1]:
            assert torch.equal(model.get_parameter(n).detach(), value) and model.get_parameter(n).requires_grad == flag, n
    monkeypatch.undo()
    configure_model(model, {"q": 3, "k": 3, "v": 3, "o": 2}, optimizer=opt)
    assert [getattr(model, n).rank for n in [*names, "o"]] == [3, 3, 3, 2]
