"""Each decision record's ``spent`` is the budget in use right after that record's change,
sum_i r_i (d_i + k_i), replayed here from the records' ranks and the layers' shapes."""

import torch
from torch import nn

import lorambo
from lorambo.allocation.online import OnlineGrowth

DT = torch.float64
# (in, out) of a chain of four layers: 0 and 1 cost 14 per rank, 2 and 3 cost 11
SHAPES = {"0": (6, 8), "1": (8, 6), "2": (6, 5), "3": (5, 6)}


def test_every_record_of_a_two_donor_move_logs_the_spend_after_its_own_change():
    # two donors shrink in one pass: both shrink records said 2 * 11 less than at the start,
    # the first one before the second donor had shrunk in the log's order
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(i, o, dtype=DT) for i, o in SHAPES.values()])
    lorambo.configure_model(net, dict.fromkeys(SHAPES, 2), capacity={"0": 4, "1": 4, "2": 2, "3": 2})
    layers = lorambo.lora_layers(net)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[:, :layer.rank].normal_()
    cost = {n: i + o for n, (i, o) in SHAPES.items()}
    start = sum(2 * c for c in cost.values())
    # 6 left: no growth (a rank costs 11 or 14, and layers 2, 3 are full), but two moves of an
    # 11 to a 14 (2 and 3 give one component each: min_rank 1)
    grower = OnlineGrowth(layers, start + 6, min_rank=1, move_threshold=0.0, max_moves=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 6, generator=g, dtype=DT)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    scores = {"0": [1.0, 1.0], "1": [1.0, 1.0], "2": [-1.0, -0.9], "3": [-0.8, -0.7]}
    records = grower.update(0, component_scores=scores)
    assert [(r["event"], r["layer"]) for r in records] == [("shrink", "2"), ("shrink", "3"),
                                                          ("grow", "0"), ("grow", "1")]
    ranks = dict.fromkeys(SHAPES, 2)
    for record in records:
        assert record["old_rank"] == ranks[record["layer"]]
        ranks[record["layer"]] = record["new_rank"]
        assert record["spent"] == sum(r * cost[n] for n, r in ranks.items()), record
    assert ranks == {"0": 3, "1": 3, "2": 1, "3": 1}
    assert records[-1]["spent"] == start + 6 == sum(m.rank * cost[n] for n, m in layers.items())


def test_a_donor_that_gives_two_components_logs_both_in_its_spend():
    # layer 2 alone gives (min_rank 0, the two lowest scores): its shrink record drops 2 * 11
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(i, o, dtype=DT) for i, o in SHAPES.values()])
    lorambo.configure_model(net, dict.fromkeys(SHAPES, 2), capacity={"0": 4, "1": 4, "2": 2, "3": 2})
    layers = lorambo.lora_layers(net)
    cost = {n: i + o for n, (i, o) in SHAPES.items()}
    start = sum(2 * c for c in cost.values())
    # 6 left: 6 + 11 - 14 = 3 funds the first move of an 11 to a 14, 3 + 11 - 14 = 0 the second
    grower = OnlineGrowth(layers, start + 6, move_threshold=0.0, max_moves=2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, 6, generator=g, dtype=DT)
    with grower.capture:
        ((net(x) - y) ** 2).mean().backward()
    scores = {"0": [1.0, 1.0], "1": [1.0, 1.0], "2": [-1.0, -0.9], "3": [1.0, 1.0]}
    records = grower.update(0, component_scores=scores)
    shrink = records[0]
    assert (shrink["event"], shrink["layer"], shrink["components"], shrink["new_rank"]) == ("shrink", "2", [0, 1], 0)
    assert shrink["spent"] == start - 2 * cost["2"]
    assert records[-1]["spent"] == start + 6 == sum(m.rank * cost[n] for n, m in layers.items())
