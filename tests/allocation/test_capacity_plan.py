"""Pool capacities: one rule shared with LoRAMBoLinear, the budget / max_rank caps, fixed pools."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorambo.allocation.capacity import (fixed_capacities, growth_capacity, plan_capacities,
                                         pool_memory)
from lorambo.nn import LoRAMBoLinear, default_capacity


def test_planner_and_layer_default_are_the_same_rule():
    dims = {f"{d}x{k}": (d, k) for d in (1, 3, 8, 17, 64, 200) for k in (2, 9, 33, 128)}
    for rank in range(0, 40):
        ranks = {n: min(rank, min(dk)) for n, dk in dims.items()}
        caps = plan_capacities(ranks, dims)  # no budget, no max_rank: nothing else caps them
        for n, (d, k) in dims.items():
            assert caps[n] == default_capacity(ranks[n], k, d), (n, rank)
    for d, k, rank in ((40, 24, 5), (64, 64, 4), (6, 40, 5), (300, 200, 0)):
        layer = LoRAMBoLinear(nn.Linear(k, d), rank=rank)
        assert layer.capacity == plan_capacities({"l": rank}, {"l": (d, k)})["l"]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.floats(1.0, 5.0), st.integers(1, 400), st.integers(1, 400))
def test_default_capacity_is_the_smallest_power_of_two_with_room(rank, factor, d, k):
    cap = default_capacity(rank, k, d, factor)
    want = max(8, 2 ** math.ceil(math.log2(math.ceil(factor * max(rank, 1)))))
    assert cap == min(want, d, k)


def test_budget_and_max_rank_cap_the_pool_but_never_below_the_rank():
    dims = (64, 32)  # 96 parameters per rank
    assert growth_capacity(4, dims) == 8
    assert growth_capacity(4, dims, budget=96 * 5) == 5          # 5 ranks are all it could pay for
    assert growth_capacity(4, dims, max_rank=6) == 6
    assert growth_capacity(4, dims, budget=96 * 2) == 4          # the allocated rank always fits
    assert growth_capacity(0, dims, budget=10) == 1              # and every pool has a slot
    assert growth_capacity(5, dims, growth_factor=4.0) == 32     # next_pow2(20), below min(d, k)
    assert growth_capacity(5, dims) == 16                        # the default doubles: next_pow2(10)


def test_fixed_capacities_are_kept_and_checked():
    dims = {"a": (10, 6), "b": (4, 4)}
    assert plan_capacities({"a": 2, "b": 1}, dims, fixed={"a": 3}) == {"a": 3, "b": 4}
    assert plan_capacities({"a": 6, "b": 1}, dims, fixed={"a": 6})["a"] == 6  # full: rank = pool = min(d, k)
    with pytest.raises(ValueError, match="capacity 3 of layer 'a' is too small for the requested rank 4"):
        plan_capacities({"a": 4, "b": 1}, dims, fixed={"a": 3})
    with pytest.raises(ValueError, match=r"capacity 7 of layer 'a' exceeds min\(d, k\) = 6"):
        plan_capacities({"a": 1, "b": 1}, dims, fixed={"a": 7})
    with pytest.raises(ValueError, match=r"no rank given for layer\(s\) \['b'\]"):
        plan_capacities({"a": 1}, dims)


def test_existing_layers_win_over_the_users_capacity():
    dims = {"a": (10, 6), "b": (4, 4)}
    assert fixed_capacities({"a": 5, "other": 9}, 2, dims) == {"a": 5, "b": 2}
    assert fixed_capacities({}, {"b": 3}, dims) == {"b": 3}
    assert fixed_capacities({}, 1, dims) == {"a": 1, "b": 1}  # the smallest pool: one slot
    with pytest.raises(ValueError, match="capacity of layer 'a' is 0: must be an int >= 1"):
        fixed_capacities({}, 0, dims)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['c'\]"):
        fixed_capacities({}, {"c": 3}, dims)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"capacity of layer 'b' is {bad!r}"):
            fixed_capacities({}, {"b": bad}, dims)
    with pytest.raises(ValueError, match="capacity 2 of layer 'a' is too small.*min_rank=3"):
        fixed_capacities({"a": 2}, None, dims, min_rank=3)
    assert fixed_capacities({"a": 3}, 4, dims, min_rank=3) == {"a": 3, "b": 4}  # exactly min_rank slots hold it


def test_pool_memory_counts_every_slot_in_the_layers_dtype():
    dims = {"a": (10, 6), "b": (4, 4)}
    report = pool_memory({"a": 4, "b": 2}, dims, {"a": torch.float32, "b": torch.float64}, {"a": 1})
    assert report["per_layer_bytes"] == {"a": 4 * 16 * 4, "b": 2 * 8 * 8}
    assert report["total_bytes"] == 4 * 16 * 4 + 2 * 8 * 8
    assert report["pool_params"] == 4 * 16 + 2 * 8 and report["active_params"] == 16
    # before any rank is decided (ranks=None) nothing is active yet; the pools are the same
    no_ranks = pool_memory({"a": 4, "b": 2}, dims, {"a": torch.float32, "b": torch.float64})
    assert no_ranks["active_params"] == 0 and no_ranks["total_bytes"] == report["total_bytes"]


def test_capacity_past_full_rank_is_refused_before_measuring():
    """capacity=16 on a model with an 8-wide layer passed the constructor and failed only in
    compute_optimal_ranks, after the sensitivities had been measured."""
    from lorambo.optimizer import LoRAMBoOptimizer

    with pytest.raises(ValueError, match=r"capacity 5 of layer 'b' exceeds min\(d, k\) = 4"):
        fixed_capacities({}, 5, {"a": (10, 6), "b": (4, 4)})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return model(batch).pow(2).mean()

    for capacity in (16, {"2": 9}):
        with pytest.raises(ValueError, match=r"capacity (16|9) of layer '2' exceeds min\(d, k\) = 8"):
            opt = LoRAMBoOptimizer(net, total_budget=2000, sensitivity_method="gradient", capacity=capacity,
                                   target_modules=["0", "2"])
            opt.compute_optimal_ranks([torch.randn(4, 32)], loss_fn)
        assert calls == []
