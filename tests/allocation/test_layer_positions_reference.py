"""Per-layer look-ups that run once per layer (a layer's seed index, the rank grid's cell, the
layers a Fisher proxy never reached) against brute-force list scans, on seeded random layer sets
whose names are not in sorted order."""

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation import alora as alora_module
from lorambo.allocation import online as online_module
from lorambo.allocation.alora import alora_round
from lorambo.allocation.online import OnlineGrowth
from lorambo.allocation.report import rank_grid, split_name
from lorambo.sensitivity import FisherProxy

DT = torch.float64


class ParallelNet(nn.Module):
    """Layers side by side (each 4 -> 4) under shuffled names; ``used`` picks those the output sums."""

    def __init__(self, names, used=None):
        super().__init__()
        self.layers = nn.ModuleDict({n: nn.Linear(4, 4, dtype=DT) for n in names})
        self.used = list(names) if used is None else list(used)

    def forward(self, x):
        return sum(self.layers[n](x) for n in self.used)


def _names(rng, count):
    names = [f"m{v}" for v in rng.sample(range(1000), count)]
    rng.shuffle(names)
    return names


def _recording(monkeypatch, module):
    calls = []
    real = module.decision_generator

    def recorded(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(module, "decision_generator", recorded)
    return calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_grid_matches_list_scans(seed):
    rng = random.Random(seed)
    kinds = ["q", "k", "v", "mlp.up", "mlp.down"]
    names = [f"enc.layer.{b}.{k}" for b in rng.sample(range(40), 12) for k in rng.sample(kinds, 3)]
    names += ["head", "embed"]
    rng.shuffle(names)
    ranks = {n: rng.randrange(1, 17) for n in names}
    rows, cols, grid = rank_grid(ranks)
    want_rows, want_cols = [], []
    for n in ranks:
        block, kind = split_name(n)
        want_rows += [block] if block not in want_rows else []
        want_cols += [kind] if kind not in want_cols else []
    want = np.full((len(want_rows), len(want_cols)), np.nan)
    for n, r in ranks.items():
        block, kind = split_name(n)
        want[want_rows.index(block), want_cols.index(kind)] = r
    assert (rows, cols) == (want_rows, want_cols)
    np.testing.assert_array_equal(grid, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_online_growth_seeds_each_grown_layer_by_its_position(seed, monkeypatch):
    rng = random.Random(seed)
    net = ParallelNet(_names(rng, 9))
    lorambo.configure_model(net, 1, capacity=3)
    layers = lorambo.lora_layers(net)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[:, :1].normal_()
    calls = _recording(monkeypatch, online_module)
    grower = OnlineGrowth(layers, budget=10**6, sketch_rank=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(12, 4, generator=g, dtype=DT)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    grown = [r["layer"] for r in grower.update(3) if r["event"] == "grow"]
    assert len(grown) >= 2
    seeds = [args for args in calls if args[1] == "init"]
    assert [args[3] for args in seeds] == [list(layers).index(n) for n in grown]


@pytest.mark.parametrize("seed", [0, 1])
def test_alora_seeds_each_receiving_layer_by_its_position(seed, monkeypatch):
    rng = random.Random(seed)
    net = ParallelNet(_names(rng, 8))
    lorambo.configure_model(net, 2, capacity=4)
    layers = lorambo.lora_layers(net)
    names = list(layers)
    scores = {n: torch.rand(2, dtype=DT) + 1.0 for n in names}
    for n in rng.sample(names, 3):
        scores[n] += 5.0  # the receivers
    calls = _recording(monkeypatch, alora_module)
    records = alora_round(net, layers, None, None, n_prune=3, scores=scores, step=4)
    received = list(dict.fromkeys(r["layer"] for r in records if r["event"] == "grow"))
    assert len(received) >= 2
    assert [args[3] for args in calls] == [names.index(n) for n in received]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_names_the_unreached_layers_in_target_order(seed):
    rng = random.Random(seed)
    names = _names(rng, 10)
    used = rng.sample(names, 6)
    net = lorambo.configure_model(ParallelNet(names, used), 2)
    proxy = FisherProxy(net)
    with proxy:
        net(torch.randn(3, 5, 4, dtype=DT)).square().sum().backward()
    targets = [t.name for t in proxy.targets]
    want = [n for n in targets if n.split(".")[-1] not in used]
    assert len(want) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimates = proxy.estimates()
    assert f"no gradient reached layer(s) {want}" in " ".join(str(w.message) for w in caught)
    assert list(estimates) == [n for n in targets if n not in want]
