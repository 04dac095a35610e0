"""torch.optim.Muon scales its learning rate by the parameter's shape. With the default
(``adjust_lr_fn`` None / "original") a padded ``lora_B`` [out, capacity] would take
sqrt(out / capacity) where the rank-r adapter takes sqrt(out / r): refused before anything
changes. With "match_rms_adamw" the pools train, across a growth, exactly as Muon on plain
tensors of the adapter's shape (the reference below, rebuilt one slot larger at the growth)."""

import pytest
import torch
from torch import nn
from torch.optim import Muon  # torch >= 2.9; lorambo needs >= 2.11

from lorambo import LoRAMBoLinear

DT = torch.float64
LR = 1e-2


def _layer(rank=2, capacity=4):
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 8, dtype=DT), rank=rank, capacity=capacity, name="fc")
    with torch.no_grad():
        layer.lora_B[:, :rank].copy_(torch.randn(8, rank, dtype=DT, generator=gen))
    x = torch.randn(5, 6, dtype=DT, generator=gen)
    return layer, x


def _loss(x, weight, bias, scaling, a, b):
    return (x @ weight.T + bias + scaling * (x @ a.T) @ b.T).square().sum()


@pytest.mark.parametrize("adjust_lr_fn", [None, "original"])
def test_muon_with_a_shape_dependent_lr_is_refused_below_capacity(adjust_lr_fn):
    layer, x = _layer()
    opt = Muon([layer.lora_A, layer.lora_B], lr=LR, adjust_lr_fn=adjust_lr_fn)
    layer(x).square().sum().backward()
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    with pytest.raises(RuntimeError, match=r"torch\.optim\.Muon with adjust_lr_fn=.* pool at rank 2 of "
                                           r"capacity 4 \(shape \(8, 4\)\) would get 1\.414 x lr where the rank-2 "
                                           r"adapter gets 2 x lr.*match_rms_adamw"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip((layer.lora_A, layer.lora_B), before)) and not opt.state
    full, _ = _layer(rank=4, capacity=4)  # no padding: nothing to refuse
    opt = Muon([full.lora_A, full.lora_B], lr=LR, adjust_lr_fn=adjust_lr_fn)
    full(x).square().sum().backward()
    opt.step()


def test_muon_matching_adamw_rms_trains_the_pool_as_the_adapter_across_a_growth():
    layer, x = _layer()
    opt = Muon([layer.lora_A, layer.lora_B], lr=LR, adjust_lr_fn="match_rms_adamw")
    a, b = (nn.Parameter(t.detach().clone()) for t in (layer.lora_A[:2], layer.lora_B[:, :2]))
    ref = Muon([a, b], lr=LR, adjust_lr_fn="match_rms_adamw")
    weight, bias = layer.weight.detach(), layer.bias.detach()
    for step in range(5):
        if step == 2:  # grow to rank 3: the reference gets the new row of A, a zero column of B and
            gen = torch.Generator().manual_seed(1)  # zero momentum for the new slot
            layer.set_rank(3, optimizer=opt, generator=gen)
            bufs = [ref.state[p]["momentum_buffer"] for p in (a, b)]
            a = nn.Parameter(torch.cat([a.detach(), layer.lora_A[2:3].detach()]))
            b = nn.Parameter(torch.cat([b.detach(), torch.zeros(8, 1, dtype=DT)], 1))
            ref = Muon([a, b], lr=LR, adjust_lr_fn="match_rms_adamw")
            ref.state[a]["momentum_buffer"] = torch.cat([bufs[0], torch.zeros(1, 6, dtype=DT)])
            ref.state[b]["momentum_buffer"] = torch.cat([bufs[1], torch.zeros(8, 1, dtype=DT)], 1)
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        ref.zero_grad()
        _loss(x, weight, bias, layer.scaling, a, b).backward()
        ref.step()
        r = layer.rank
        torch.testing.assert_close(layer.lora_A[:r].detach(), a.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lora_B[:, :r].detach(), b.detach(), rtol=1e-12, atol=1e-12)
        assert not layer.lora_A[r:].any() and not layer.lora_B[:, r:].any()
    assert not torch.equal(layer.lora_B[:, 2], torch.zeros(8, dtype=DT))  # the grown slot trained


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_steps_a_pool_at_rank_zero(adjust_lr_fn):
    """At rank 0 nothing is active and every update is 0, whatever the lr factor: not refused
    (a rank-0 adapter has no [out, 0] lr factor to compare with)."""
    layer, x = _layer(rank=0)
    opt = Muon([layer.lora_A, layer.lora_B], lr=LR, adjust_lr_fn=adjust_lr_fn)
    out = layer(x)
    torch.testing.assert_close(out, x @ layer.weight.T + layer.bias, rtol=0, atol=0)
    out.square().sum().backward()
    opt.step()
    assert not layer.lora_A.any() and not layer.lora_B.any()
