"""The probe's knapsack rule: per-direction gains from the probe update's spectrum, then ranks."""

import pytest
import torch

from lorambo import allocate
from lorambo.experiments.probe import direction_gains
from lorambo.nn import LoRAMBoLinear


def _layer(rank, capacity, seed):
    torch.manual_seed(seed)
    layer = LoRAMBoLinear(torch.nn.Linear(13, 11), rank=rank, capacity=capacity)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return layer


def test_gains_split_the_removal_score_by_direction_energy():
    layer = _layer(rank=3, capacity=5, seed=0)
    gains = direction_gains(0.7, layer)
    update = (layer.lora_B[:, :3].double() @ layer.lora_A[:3].double()).detach()
    energy = torch.linalg.eigvalsh(update @ update.T).flip(0)[:3]  # σ² from a different route
    assert gains == pytest.approx((0.7 * energy / energy.sum()).tolist(), rel=1e-9)
    assert sum(gains) == pytest.approx(0.7, rel=1e-12)
    assert gains == sorted(gains, reverse=True) and len(gains) == 3  # inactive slots ignored



def test_a_small_update_still_splits_its_removal_score():
    """A probe update of little energy (Σσ² ~ 1e-4, as after a short run) is not a zero update."""
    layer = _layer(rank=2, capacity=3, seed=3)
    with torch.no_grad():
        layer.lora_B.mul_(1e-3)
    update = (layer.lora_B[:, :2].double() @ layer.lora_A[:2].double()).detach()
    energy = torch.linalg.eigvalsh(update @ update.T).flip(0)[:2]
    assert float(energy.sum()) < 1e-2
    assert direction_gains(0.3, layer) == pytest.approx((0.3 * energy / energy.sum()).tolist(), rel=1e-9)

def test_zero_update_or_zero_removal_gives_zero_gains():
    layer = _layer(rank=2, capacity=4, seed=1)
    with torch.no_grad():
        layer.lora_B.zero_()
    assert direction_gains(0.5, layer) == [0.0, 0.0]
    assert direction_gains(0.0, _layer(rank=2, capacity=4, seed=2)) == [0.0, 0.0]


def test_knapsack_buys_a_layer_the_directions_its_update_needs():
    # layer "two" carries its loss in 2 equal directions, "one" in 1: at equal removal scores and
    # costs, a budget of 3 ranks buys exactly those, where the square-root law would split evenly.
    dims = {"one": (10, 10), "two": (10, 10), "none": (10, 10)}
    benefits = {"one": [0.5, 0.0, 0.0], "two": [0.25, 0.25, 0.0], "none": [0.0, 0.0, 0.0]}
    ranks = allocate(dims, None, 3 * 20, method="knapsack", benefits=benefits)
    assert ranks == {"one": 1, "two": 2, "none": 0}
