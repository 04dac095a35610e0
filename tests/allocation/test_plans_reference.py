"""plan_moves (online growth) and ALoRA's _plan against their straightforward versions.

Both used to be quadratic in Python: plan_moves scanned every donor component for every receiver
(O(receivers x components) when few donors could fund a receiver: 32 ms at 224 layers of 7B
shapes) and _plan rebuilt the layer list for every sort key. The references below are those
versions; the plans must be the same, ties included.
"""
from types import SimpleNamespace

import numpy as np
import torch

from lorambo.allocation.alora import _plan
from lorambo.allocation.online import plan_moves


def _ref_plan_moves(next_gains, scores, costs, room, budget_left, threshold, move_threshold, max_moves=1,
                    spare=None):
    """The scan of every donor per receiver (each layer's first ``spare`` components only): a receiver's
    rank is paid by the cheaper (in summed score) of the lowest-scored donor that pays alone and
    the lowest-scored donors in order until they pay, pruned from the highest score down."""
    receivers = sorted((n for n, g in next_gains.items() if g > threshold and room.get(n, 0) > 0),
                       key=lambda n: -next_gains[n] / costs[n])
    donors = sorted((float(s), n, k) for n, sc in scores.items() for k, s in enumerate(sc)
                    if float(s) < move_threshold)
    moves, left, used = [], int(budget_left), set()
    donor_layers, receiving = set(), set()
    for recv in receivers:
        if len(receiving) >= max_moves:
            break
        if recv in donor_layers:
            continue
        eligible = []
        for i, entry in enumerate(donors):
            _, donor, _ = entry
            # a layer's components leave in score order: only its first `spare` ever can
            if spare is not None and sum(e[1] == donor for e in donors[:i]) >= spare.get(donor, 0):
                continue
            if entry not in used and donor != recv and donor not in receiving:
                eligible.append(entry)
        price = costs[recv] - left
        if not eligible or sum(costs[e[1]] for e in eligible) < price:
            continue
        singles = [e for e in eligible if costs[e[1]] >= price]
        prefix = next(eligible[:i] for i in range(1, len(eligible) + 1)
                      if sum(costs[e[1]] for e in eligible[:i]) >= price)
        for entry in sorted(prefix, key=lambda e: -e[0]):
            rest = [e for e in prefix if e != entry]
            if entry[0] >= 0 and rest and sum(costs[e[1]] for e in rest) >= price:
                prefix = rest
        take = [singles[0]] if singles and singles[0][0] <= sum(e[0] for e in prefix) else prefix
        for entry in take:
            moves.append((entry[1], entry[2], recv))
            used.add(entry)
            donor_layers.add(entry[1])
            left += costs[entry[1]]
        left -= costs[recv]
        receiving.add(recv)
    return moves


def _ref_alora_plan(layers, scores, n_prune, budget):
    costs = {n: m.in_features + m.out_features for n, m in layers.items()}
    left = budget - sum(costs[n] * m.rank for n, m in layers.items())
    ranked = sorted((float(s), n, k) for n, sc in scores.items() for k, s in enumerate(sc.tolist()))
    worst = ranked[:n_prune]
    pruned_layers = {n for _, n, _ in worst}
    means = {n: float(sc.mean()) for n, sc in scores.items() if sc.numel() and n not in pruned_layers}
    receivers = sorted(means, key=lambda n: (-means[n], list(layers).index(n)))
    extra = dict.fromkeys(receivers, 0)
    prune, receive, turn = {}, [], 0
    for _, donor, comp in worst:
        for j in range(len(receivers)):
            recv = receivers[(turn + j) % len(receivers)]
            fits = layers[recv].rank + extra[recv] < layers[recv].capacity
            if fits and left + costs[donor] - costs[recv] >= 0:
                prune.setdefault(donor, []).append(comp)
                receive.append(recv)
                extra[recv] += 1
                left += costs[donor] - costs[recv]
                turn = (turn + j + 1) % len(receivers)
                break
    return prune, receive


def _layers(rng, n):
    shapes = rng.integers(2, 40, size=(int(rng.integers(1, 4)), 2))  # a few shapes: equal costs
    dk = shapes[rng.integers(len(shapes), size=n)]
    return {f"l{i}": (int(d), int(k)) for i, (d, k) in enumerate(dk)}


def test_plan_moves_matches_the_scan_of_every_donor():
    rng = np.random.default_rng(3)
    made = several = 0
    for _ in range(400):
        n = int(rng.integers(1, 25))
        dims = _layers(rng, n)
        costs = {name: d + k for name, (d, k) in dims.items()}
        gains = {name: float(rng.choice([-1.0, 0.5, 1.0, rng.random()])) for name in dims}
        scores = {name: rng.choice([-1.0, 0.0, 0.5, rng.normal()], int(rng.integers(0, 6))) for name in dims}
        room = {name: int(rng.integers(0, 3)) for name in dims}
        args = (gains, scores, costs, room, int(rng.integers(-20, 60)), 0.0, float(rng.choice([0.0, 0.6])))
        max_moves = int(rng.integers(1, 6))
        ref = _ref_plan_moves(*args, max_moves=max_moves)
        assert plan_moves(*args, max_moves=max_moves) == ref
        made += bool(ref)
        receivers = [r for _, _, r in ref]
        several += len(receivers) > len(set(receivers))
        if len(set(costs.values())) == 1 and args[4] >= 0:  # one component always pays: one each
            assert len(receivers) == len(set(receivers))
    assert made >= 100 and several >= 20


def test_alora_plan_matches_the_straightforward_one():
    rng = np.random.default_rng(4)
    for _ in range(300):
        dims = _layers(rng, int(rng.integers(1, 20)))
        ranks = {name: int(rng.integers(0, 5)) for name in dims}
        layers = {name: SimpleNamespace(out_features=d, in_features=k, rank=ranks[name], capacity=6)
                  for name, (d, k) in dims.items()}
        # scores from a few values: tied means decide the receivers' order by layer position
        scores = {name: torch.as_tensor(rng.choice([0.0, 1.0, 2.0], ranks[name]), dtype=torch.float64)
                  for name in dims}
        budget = sum((d + k) * ranks[name] for name, (d, k) in dims.items()) + int(rng.integers(0, 40))
        n_prune = int(rng.integers(1, 5))
        assert _plan(layers, scores, n_prune, budget) == _ref_alora_plan(layers, scores, n_prune, budget)
