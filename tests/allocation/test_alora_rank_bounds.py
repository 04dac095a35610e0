"""ALoRA rounds keep LoRAMBoOptimizer's min_rank and max_rank: the n_prune worst components are
those a layer can give without dropping below min_rank, and no receiver grows past max_rank."""

import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation.alora import ALoRAConfig, alora_round
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _three_layers(ranks, capacity=6):
    net = nn.Sequential(nn.Linear(8, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 8, dtype=DT), nn.Tanh(),
                        nn.Linear(8, 8, dtype=DT))
    model = lorambo.configure_model(net, ranks, capacity=capacity)
    return model, lorambo.lora_layers(model)


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _scores(values):
    return {n: torch.tensor(v, dtype=DT) for n, v in values.items()}


def test_prune_skips_what_min_rank_protects_and_takes_the_next_worst():
    # "0" may give one component (rank 2, min_rank 1): its second -1.0 stays, and the next
    # worst, 0.5 of "2", goes instead. Only "4" receives (pruned layers do not), up to max_rank.
    model, layers = _three_layers({"0": 2, "2": 2, "4": 2})
    records = alora_round(model, layers, _mse, None, n_prune=2, min_rank=1, max_rank=3,
                          scores=_scores({"0": [-1.0, -1.0], "2": [0.5, 3.0], "4": [5.0, 5.0]}))
    assert {n: m.rank for n, m in layers.items()} == {"0": 1, "2": 2, "4": 3}
    assert [(r["event"], r["layer"]) for r in records] == [("shrink", "0"), ("grow", "4")]


def test_receivers_stop_at_max_rank_below_their_capacity():
    # "4" (most important) is at max_rank 3 already: the freed ranks go to "2", which then
    # reaches 3 too, so the second -1.0 component of "0" stays
    model, layers = _three_layers({"0": 2, "2": 2, "4": 3})
    alora_round(model, layers, _mse, None, n_prune=2, max_rank=3,
                scores=_scores({"0": [-1.0, -1.0], "2": [1.0, 1.0], "4": [5.0, 5.0, 5.0]}))
    assert {n: m.rank for n, m in layers.items()} == {"0": 1, "2": 3, "4": 3}


def test_optimizer_rounds_keep_its_rank_bounds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8, dtype=DT), nn.Tanh(), nn.Linear(8, 8, dtype=DT), nn.Tanh(),
                        nn.Linear(8, 8, dtype=DT))
    heldout = [(torch.randn(16, 8, dtype=DT), torch.randn(16, 8, dtype=DT))]
    # min_rank = max_rank = 2: every move would break a bound (without them the rounds moved ranks)
    opt = LoRAMBoOptimizer(net, total_budget=16 * 6, allocation="alora", min_rank=2, max_rank=2,
                           capacity=6, loss_fn=_mse, heldout_batches=heldout,
                           alora=ALoRAConfig(k1=0, k2=1, rounds=3, n_prune=1))
    assert opt.compute_optimal_ranks() == {"0": 2, "2": 2, "4": 2}
    opt.configure()
    for layer in opt.layers().values():
        layer.lora_B.data[:, :layer.rank].normal_()
    for step in range(3):
        opt.step(step)
        assert opt.current_ranks() == {"0": 2, "2": 2, "4": 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"min_rank": -1}, "min_rank=-1"), ({"max_rank": 2.5}, "max_rank=2.5"),
    ({"min_rank": 3, "max_rank": 2}, "min_rank=3 > max_rank=2"),
])
def test_bad_rank_bounds_are_refused(kwargs, message):
    model, layers = _three_layers({"0": 2, "2": 2, "4": 2})
    with pytest.raises(ValueError, match=message):
        alora_round(model, layers, _mse, None, n_prune=1, scores=_scores(
            {"0": [1.0, 1.0], "2": [1.0, 1.0], "4": [1.0, 1.0]}), **kwargs)
