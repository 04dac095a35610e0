"""Fine-tuning recipes with several parameter groups (LoRA+: lora_B at 16x the lr of lora_A;
layer-wise lr; weight decay on A only) and gradient clipping, across a rank move between layers
of different groups taken between two accumulated micro-batches: each slot trains with its
group's hyperparameters, a new slot as under a fresh AdamW, a moved one keeps its state.

Reference, in float64: every slot is its own pair of Parameters (a row of A, a column of B)
under torch.optim.AdamW, in a param group of its own with its layer's hyperparameters: a moved
slot is the same pair, a dropped one leaves the optimizer, a new one joins it fresh."""

import pytest
import torch
from torch import nn

from lorambo import LoRAMBoLinear
from lorambo.nn import keep_components_many
from lorambo.optim import AdamW

DT = torch.float64
HYPER = {("l1", "A"): dict(lr=1e-2, weight_decay=0.1), ("l1", "B"): dict(lr=1.6e-1, weight_decay=0.0),
         ("l2", "A"): dict(lr=2e-2, weight_decay=0.1), ("l2", "B"): dict(lr=3.2e-1, weight_decay=0.0)}
BETAS, CLIP = (0.9, 0.99), 0.05

pytestmark = pytest.mark.usefixtures("one_thread")


class PerSlotReference:
    def __init__(self, layers):
        self.layers = layers
        self.slots = {n: [] for n in layers}
        self.opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1, dtype=DT))], betas=BETAS)  # placeholder group
        self.opt.param_groups.clear()
        for name, layer in layers.items():
            for i in range(layer.rank):
                self.add(name, layer.lora_A[i], layer.lora_B[:, i])

    def add(self, name, a_row, b_col, zero_grad=False):
        pair = (nn.Parameter(a_row.detach().clone()), nn.Parameter(b_col.detach().clone()))
        for param, pool in zip(pair, "AB"):
            if zero_grad:  # joined between backward and step: its gradient of this step is 0
                param.grad = torch.zeros_like(param)
            self.opt.add_param_group(dict(params=[param], **HYPER[(name, pool)]))
        self.slots[name].append(pair)

    def keep(self, name, keep):
        dropped = {id(p) for i, pair in enumerate(self.slots[name]) if i not in keep for p in pair}
        self.slots[name] = [self.slots[name][i] for i in keep]
        self.opt.param_groups[:] = [g for g in self.opt.param_groups if id(g["params"][0]) not in dropped]

    def params(self):
        return [p for pairs in self.slots.values() for pair in pairs for p in pair]

    def layer(self, name, x):
        layer, pairs = self.layers[name], self.slots[name]
        y = x @ layer.base_layer.weight.T + layer.base_layer.bias
        a, b = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs], 1)
        return y + layer.scaling * (x @ a.T) @ b.T

    def __call__(self, x):
        return self.layer("l2", torch.tanh(self.layer("l1", x)))


def test_lora_plus_groups_clipping_and_a_rank_move_between_micro_batches():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers = {"l1": LoRAMBoLinear(nn.Linear(6, 7, dtype=DT), rank=3, capacity=4, alpha=2.0, name="l1"),
              "l2": LoRAMBoLinear(nn.Linear(7, 5, dtype=DT), rank=2, capacity=4, alpha=2.0, name="l2")}
    for layer in layers.values():
        layer.lora_B.data[:, :layer.rank].normal_(generator=gen)
    model = lambda x: layers["l2"](torch.tanh(layers["l1"](x)))  # noqa: E731
    opt = AdamW([dict(params=[getattr(layers[n], f"lora_{p}")], **h) for (n, p), h in HYPER.items()], betas=BETAS)
    ref = PerSlotReference(layers)

    def micro_batch():
        x, t = torch.randn(9, 6, dtype=DT, generator=gen), torch.randn(9, 5, dtype=DT, generator=gen)
        (model(x) - t).square().mean().backward()
        (ref(x) - t).square().mean().backward()

    def step():
        clipped = torch.nn.utils.clip_grad_norm_([p for layer in layers.values() for p in layer.parameters()
                                                  if p.requires_grad], CLIP)
        torch.testing.assert_close(clipped, torch.nn.utils.clip_grad_norm_(ref.params(), CLIP), rtol=1e-12, atol=0)
        assert clipped > CLIP  # the clipping acts
        opt.step()
        ref.opt.step()
        opt.zero_grad()
        ref.opt.zero_grad()

    for i in range(8):
        micro_batch()
        if i == 3:  # l1 drops its component 1 and l2 takes a rank, between two micro-batches
            keep_components_many([(layers["l1"], [2, 0])], opt)
            ref.keep("l1", [2, 0])
            layers["l2"].set_rank(3, optimizer=opt, generator=torch.Generator().manual_seed(5))
            ref.add("l2", layers["l2"].lora_A[2], layers["l2"].lora_B[:, 2], zero_grad=True)
        micro_batch()
        step()
    assert [layer.rank for layer in layers.values()] == [2, 3]
    for name, layer in layers.items():
        for i, (a, b) in enumerate(ref.slots[name]):
            torch.testing.assert_close(layer.lora_A[i].detach(), a.detach(), rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(layer.lora_B[:, i].detach(), b.detach(), rtol=1e-10, atol=1e-13)
        assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
