"""Rank moves scored from ``heldout_batches``: each component's score is the held-out loss its
removal costs (AB-LoRA's ``removed``), not ALoRA's removed + alone; checked against the losses
computed by hand in float64."""

import math

import torch
from torch import nn

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _removal_costs(model, layers, heldout):
    """``{(name, k): L(without component k) - L(all)}`` by zeroing column k of B by hand."""
    with torch.no_grad():
        full = sum(float(_mse(model, b)) for b in heldout) / len(heldout)
        costs = {}
        for name, layer in layers.items():
            for k in range(layer.rank):
                kept = layer.lora_B[:, k].clone()
                layer.lora_B[:, k] = 0
                costs[name, k] = sum(float(_mse(model, b)) for b in heldout) / len(heldout) - full
                layer.lora_B[:, k] = kept
    return costs


def test_moves_from_heldout_batches_are_scored_by_the_loss_a_removal_costs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 8, dtype=DT), nn.Tanh(),
                          nn.Linear(8, 5, dtype=DT))
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 6, generator=gen, dtype=DT), torch.randn(32, 5, generator=gen, dtype=DT))
    heldout = [(torch.randn(16, 6, generator=gen, dtype=DT), torch.randn(16, 5, generator=gen, dtype=DT))]
    opt = LoRAMBoOptimizer(model, total_budget=2 * (14 + 16 + 13), target_modules=["0", "2", "4"],
                           allocation="uniform", capacity=4, warmup_steps=3, interval=100,
                           loss_improvement_threshold=0.0, move_threshold=math.inf, max_moves=2,
                           heldout_batches=heldout, loss_fn=_mse, seed=0)
    opt.compute_optimal_ranks()
    opt.configure()
    layers = lorambo.lora_layers(model)
    torch_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    records = []
    for step in range(4):
        with opt.capture(step, batch):
            _mse(model, batch).backward()
        if opt.is_decision_step(step):
            expected = _removal_costs(model, layers, heldout)
        records += opt.step(step, optimizer=torch_opt)
        torch_opt.step()
        torch_opt.zero_grad()
    shrinks = [r for r in records if r["event"] == "shrink" and r["reason"] == "move"]
    assert shrinks, "no move was made"
    for r in shrinks:
        want = [expected[r["layer"], k] for k in r["components"]]
        assert all(math.isclose(s, w, rel_tol=1e-9, abs_tol=1e-15) for s, w in zip(r["scores"], want))
    assert all(abs(w) > 1e-8 for w in expected.values())  # trained components: scores that can differ
