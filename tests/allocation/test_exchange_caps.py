"""exchange.improve runs the moves up to and including MAX_LAYERS layers and MAX_COSTS distinct
costs ("larger ones keep the fill"): the boundary itself still gets them."""
import numpy as np

from lorambo.allocation import exchange


def test_the_moves_run_at_exactly_max_layers_and_max_costs(monkeypatch):
    calls = []
    real_move = exchange._move

    def counting_move(*args):
        calls.append(1)
        return real_move(*args)

    monkeypatch.setattr(exchange, "_move", counting_move)
    rng = np.random.default_rng(3)
    n = exchange.MAX_LAYERS
    costs = (10 + np.arange(n) % exchange.MAX_COSTS).astype(np.int64)  # exactly MAX_COSTS distinct costs
    assert len(np.unique(costs)) == exchange.MAX_COSTS
    sens = rng.lognormal(0.0, 1.0, n)
    sens /= sens.max()
    lower, upper = np.zeros(n, np.int64), np.full(n, 4)
    got = exchange.improve(costs, np.zeros(n, np.int64), sens, lower, upper, int(costs.sum()) * 2 + 7)
    assert calls, "no exchange move was tried at the caps"
    assert int(np.dot(costs, got)) <= int(costs.sum()) * 2 + 7
    # one layer past MAX_LAYERS: the fill alone
    calls.clear()
    exchange.improve(np.append(costs, 10), np.zeros(n + 1, np.int64), np.append(sens, 0.5), np.zeros(n + 1, np.int64),
                     np.full(n + 1, 4), int(costs.sum()) * 2)
    assert not calls
