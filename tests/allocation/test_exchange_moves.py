"""exchange._move, one move at a time, against the O(n^2) scan of tests/allocation/test_exchange_reference.py.

The whole search (improve) reaches the same local optimum from many wrong intermediate moves, so
comparing final ranks lets a move that picks the wrong pair, or breaks a tie the wrong way, go
unnoticed (found by mutation testing). Here every move is compared from states the search
really starts from (ranks filled by exchange.fill), with few distinct sensitivities and costs so
that ties are common: the same givers, the same takers, the same gain.
"""
import numpy as np
from test_exchange_reference import _ref_move

from lorambo.allocation import exchange


def _filled_states(seed, count):
    """(costs, sens, ranks, lower, move_upper, left): random ranks topped up by the fill."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(2, 14))
        costs = rng.choice(rng.integers(2, 40, size=int(rng.integers(1, 4))), n).astype(np.int64)
        if rng.random() < 0.5:  # ties: a few sensitivity values, zeros among them
            sens = rng.choice([0.0, 0.125, 0.25, 0.5, 1.0], n)
        else:  # wide spread: loss drops of very different sizes meet in one pair
            sens = rng.lognormal(0.0, 4.0, n)
        sens[0] = sens[0] if sens.any() else 1.0
        sens = sens / sens.max()
        upper = rng.integers(0, 9, n)
        lower = np.minimum(upper, rng.integers(0, 3, n))
        take_upper = upper - (rng.random(n) < 0.3)  # the closed form's ceilings sit below upper
        start = lower + (rng.random(n) * (upper - lower + 1)).astype(np.int64)
        budget = int(np.dot(costs, start)) + int(rng.integers(0, 60))
        ranks = exchange.fill(costs, start, upper, budget, sens)
        yield costs, sens, ranks, lower, np.minimum(upper, take_upper), budget - int(np.dot(costs, ranks))


def test_each_move_is_the_reference_scans_move():
    kinds = {"swap": 0, "split": 0, "merge": 0}
    for costs, sens, ranks, lower, move_upper, left in _filled_states(20261207, 1500):
        got = exchange._move(exchange._CostClasses(costs), costs, sens, ranks, lower, move_upper, left)
        ref = _ref_move(costs, sens, ranks, lower, move_upper, left)
        state = (costs.tolist(), sens.tolist(), ranks.tolist(), lower.tolist(), move_upper.tolist(), left)
        assert tuple(map(int, got[1])) == tuple(map(int, ref[1])), state
        assert tuple(map(int, got[2])) == tuple(map(int, ref[2])), state
        assert got[0] == ref[0], state
        if got[0] > 0:
            kinds["swap" if len(got[1]) == len(got[2]) else "split" if len(got[2]) == 2 else "merge"] += 1
    assert min(kinds.values()) >= 30, kinds  # every kind of move was compared, not only "no move"


def test_a_pair_of_loss_drops_far_apart_in_size_is_found():
    # the best split from layer 10 gives layers 2 and 7 a rank: loss drops ~1e-2 and ~1e-7. The
    # pruning floor value - partner rounds at the size of the larger; its slack must cover that,
    # or layer 7 is pruned and no pair is found (state from a seeded search over mutants)
    costs = np.array([36, 36, 23, 36, 36, 36, 2, 2, 2, 36, 36, 2, 2])
    sens = np.array([0.9174517651386893, 0.07524743270234131, 0.16516040308031, 0.2884022364650976, 1.0,
                     0.8080354032701046, 6.796537510784545e-05, 2.1101061647476195e-06, 0.00010665855295969911,
                     0.2717896790774967, 0.1229049884403989, 0.0020631121620979078, 0.005402040955914248])
    ranks = np.array([7, 3, 4, 1, 8, 1, 6, 4, 7, 4, 7, 1, 4])
    lower = np.array([1, 1, 1, 0, 0, 0, 0, 1, 2, 2, 2, 0, 2])
    move_upper = np.array([7, 3, 6, 1, 8, 0, 5, 7, 6, 4, 7, 1, 4])
    got = exchange._move(exchange._CostClasses(costs), costs, sens, ranks, lower, move_upper, 1)
    ref = _ref_move(costs, sens, ranks, lower, move_upper, 1)
    assert (got[1], tuple(map(int, got[2]))) == ((10,), (2, 7)) == (ref[1], tuple(map(int, ref[2])))
    assert got[0] == ref[0] > 0


def _move_and_reference(costs, sens, ranks, budget):
    n = len(costs)
    lower, upper, left = np.zeros(n, np.int64), np.full(n, 8), budget - int(np.dot(costs, ranks))
    got = exchange._move(exchange._CostClasses(costs), costs, sens, ranks, lower, upper, left)
    ref = _ref_move(costs, sens, ranks, lower, upper, left)
    return (got[1], tuple(map(int, got[2]))), (ref[1], tuple(map(int, ref[2])))


def test_a_split_to_one_layer_twice_skips_an_equal_layer_that_does_not_fit():
    # layer 2 (cost 10) frees 10: two ranks of layer 1 (cost 5) fit, two of layer 0 (cost 6,
    # the same loss drops, earlier) would cost 12, and one of each 11. Layer 0 taking two ranks
    # would overspend the budget
    costs, sens, ranks = np.array([6, 5, 10]), np.array([1.0, 1.0, 0.01]), np.array([1, 1, 3])
    got, ref = _move_and_reference(costs, sens, ranks, 41)
    assert got == ((2,), (1, 1)) == ref


def test_a_merge_of_two_ranks_of_one_layer_skips_an_equal_layer_that_frees_too_little():
    # layer 2 (cost 10) takes a rank freed by two ranks of layer 1 (cost 5: 10); two of layer 0
    # (cost 4, the same loss drops, earlier) free 8 and one of each 9: the move overspends
    costs, sens, ranks = np.array([4, 5, 10]), np.array([0.01, 0.01, 1.0]), np.array([3, 3, 1])
    got, ref = _move_and_reference(costs, sens, ranks, 37)
    assert got == ((1, 1), (2,)) == ref
