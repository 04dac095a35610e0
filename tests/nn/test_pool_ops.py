"""keep_components_many: one pass over many pools, bit for bit the per-layer keep_components."""

import copy

import pytest
import torch
from torch import nn

import lorambo
from lorambo.ext import ops as ext_ops
from lorambo.nn import keep_components_many


def _trained(seed, optimizer_class=torch.optim.Adam):
    gen = torch.Generator().manual_seed(seed)
    dims = [(12, 7, 4, 6), (7, 9, 6, 6), (8, 8, 3, 8), (8, 10, 5, 7)]  # in, out, rank, capacity
    # trained at full capacity (torch.optim.Adafactor refuses padded pools), then shrunk
    model = nn.Sequential(*[lorambo.LoRAMBoLinear(nn.Linear(i, o), rank=c, capacity=c) for i, o, r, c in dims])
    with torch.no_grad():
        for layer in model:
            layer.lora_B.normal_(generator=gen)
    opt = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):  # real, distinct moments in every active slot, then fresh gradients
        if step == 2:
            for layer, (_, _, r, _) in zip(model, dims):
                layer.set_rank(r, optimizer=opt)
        loss = sum(layer(torch.randn(3, layer.in_features, generator=gen)).square().sum() for layer in model)
        loss.backward()
        if step < 2:
            opt.step()
            opt.zero_grad()
    return model, opt


def _snapshot(model, opt):
    out = [t.clone() for layer in model for t in (layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad)]
    out += [v.clone() for p in opt.state for v in opt.state[p].values() if torch.is_tensor(v)]
    return out, [layer.rank for layer in model]


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, lorambo.optim.AdamW, torch.optim.Adafactor])
def test_matches_per_layer_keep_components_bit_for_bit(backend, monkeypatch, optimizer_class):
    seed = int(torch.randint(0, 2**30, ()))
    model, opt = _trained(seed, optimizer_class)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    for param, ref in zip(model.parameters(), ref_model.parameters()):  # deepcopy drops .grad
        ref.grad = None if param.grad is None else param.grad.clone()
    plans = {0: [3, 1], 1: [], 3: [4, 0, 2, 1]}  # shrink, prune everything, permute-and-shrink
    for i, keep in plans.items():
        ref_model[i].keep_components(keep, ref_opt)
    calls = []
    if ext_ops.available():
        real = ext_ops.pool_remap_
        monkeypatch.setattr(ext_ops, "pool_remap_", lambda *a: calls.append(1) or real(*a))
    old = keep_components_many([(model[i], keep) for i, keep in plans.items()], opt)
    assert old == [4, 6, 5]
    assert bool(calls) == (backend == "auto" and ext_ops.available())
    got, got_ranks = _snapshot(model, opt)
    want, want_ranks = _snapshot(ref_model, ref_opt)
    assert got_ranks == want_ranks == [2, 0, 3, 4]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for layer in model:  # inactive slots, and their gradients, are exactly zero
        for t in (layer.lora_A, layer.lora_A.grad):
            assert not t[layer.rank:].any()
        for t in (layer.lora_B, layer.lora_B.grad):
            assert not t[:, layer.rank:].any()


def test_bad_plan_is_refused_before_any_pool_changes(backend):
    model, opt = _trained(0)
    before, ranks = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"component indices \[7\] outside active range \[0, 6\)"):
        keep_components_many([(model[0], [0]), (model[1], [7])], opt)
    with pytest.raises(ValueError, match="appears twice"):
        keep_components_many([(model[0], [0]), (model[0], [1])], opt)
    after, ranks_after = _snapshot(model, opt)
    assert ranks_after == ranks and all(torch.equal(a, b) for a, b in zip(before, after))
