"""transformers' own Adafactor (Trainer's optim="adafactor") scales and clips each step by RMS
values of the whole parameter and update and averages its factored second moment over whole
rows and columns, where a pool's inactive zero slots count: below full capacity its updates are
not those of Adafactor on the rank-r adapter (shown on untagged copies of the pools, against
plain adapter-shaped tensors), so its step is refused before anything changes, as
torch.optim.Adafactor's is. At full capacity it trains as usual."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear

Adafactor = pytest.importorskip("transformers.optimization").Adafactor
DT = torch.float64


def _layer(rank, capacity):
    gen = torch.Generator().manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 8, dtype=DT), rank=rank, capacity=capacity)
    with torch.no_grad():
        layer.lora_B[:, :rank].copy_(torch.randn(8, rank, dtype=DT, generator=gen))
    return layer, torch.randn(5, 6, dtype=DT, generator=gen)


def test_transformers_adafactor_is_refused_below_capacity():
    layer, x = _layer(2, 4)
    layer(x).square().sum().backward()
    padded = [nn.Parameter(p.detach().clone()) for p in (layer.lora_A, layer.lora_B)]  # untagged copies
    adapter = [nn.Parameter(layer.lora_A[:2].detach().clone()), nn.Parameter(layer.lora_B[:, :2].detach().clone())]
    for copy, p in zip(padded, (layer.lora_A, layer.lora_B)):
        copy.grad = p.grad.clone()
    adapter[0].grad, adapter[1].grad = layer.lora_A.grad[:2].clone(), layer.lora_B.grad[:, :2].clone()
    Adafactor(padded).step()
    Adafactor(adapter).step()
    gap = (padded[0][:2] - adapter[0]).abs().max()
    assert gap > 1e-5, gap  # why it is refused: the padded update is another one
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    opt = Adafactor([layer.lora_A, layer.lora_B])
    with pytest.raises(RuntimeError, match=r"transformers\.optimization\.Adafactor cannot train a LoRAMBoLinear pool "
                                           r"below its capacity \(a pool at rank 2 of capacity 4"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip((layer.lora_A, layer.lora_B), before)) and not opt.state


def test_transformers_adafactor_trains_a_full_pool():
    layer, x = _layer(4, 4)
    opt = Adafactor([layer.lora_A, layer.lora_B])
    before = layer.lora_A.detach().clone()
    layer(x).square().sum().backward()
    opt.step()
    assert not torch.equal(layer.lora_A, before)
