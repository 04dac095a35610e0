"""ALoRA prune-and-reallocate: total rank conserved, budget kept, worst components pruned."""

import copy
import math

import pytest
import torch

import lorambo
from lorambo.allocation.alora import ALoRA, ALoRAConfig, alora_round
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_alora_loop_conserves_total_rank_within_budget():
    model = ResidualNet(hidden=12)
    target = ResidualNet(hidden=12)
    heldout = [(x, target(x).detach()) for x in (torch.randn(16, 8, dtype=DT) for _ in range(2))]
    budget = 20 * 12  # 12 ranks of cost 20 over 4 layers
    opt = LoRAMBoOptimizer(model, budget, allocation="alora", loss_fn=mse, heldout_batches=heldout,
                           alora=ALoRAConfig(k1=2, k2=3, rounds=3, n_prune=2), log_path=None)
    ranks = opt.compute_optimal_ranks()
    assert sorted(ranks.values()) == [3, 3, 3, 3]  # uniform, budget-compliant start
    opt.configure()
    torch_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    total = sum(ranks.values())
    events = []
    for step in range(10):
        x = torch.randn(16, 8, dtype=DT)
        mse(model, (x, target(x).detach())).backward()
        records = opt.step(step, optimizer=torch_opt)
        torch_opt.step()
        torch_opt.zero_grad()
        if records:
            events.append(step)
        current = opt.current_ranks()
        assert sum(current.values()) == total
        assert sum(opt.costs[n] * r for n, r in current.items()) <= budget
    assert events == [2, 5, 8]
    shrinks = [r for r in opt.decisions if r["event"] == "shrink"]
    grows = [r for r in opt.decisions if r["event"] == "grow"]
    assert shrinks and sum(r["old_rank"] - r["new_rank"] for r in shrinks) == \
        sum(r["new_rank"] - r["old_rank"] for r in grows)
    assert opt.current_ranks() != ranks  # ranks actually moved


def test_round_prunes_the_worst_and_feeds_the_most_important():
    model = lorambo.configure_model(ResidualNet(hidden=12, blocks=2), 3, capacity=6)
    layers = lorambo.lora_layers(model)
    for layer in layers.values():
        layer.lora_B.data[:, :3].normal_()
    names = list(layers)
    scores = {n: torch.rand(3, dtype=DT) + 1.0 for n in names}
    scores[names[0]][1] = -1.0  # harmful
    scores[names[2]][0] = 0.01  # useless
    scores[names[3]] += 5.0     # most important module
    scores[names[1]] += 2.0     # second
    x = torch.randn(5, 8, dtype=DT)
    expected = copy.deepcopy(model)
    lorambo.lora_layers(expected)[names[0]].keep_components([0, 2])
    lorambo.lora_layers(expected)[names[2]].keep_components([1, 2])
    records = alora_round(model, layers, mse, None, n_prune=2, scores=scores, step=7)
    ranks = {n: m.rank for n, m in layers.items()}
    assert ranks == {names[0]: 2, names[1]: 4, names[2]: 2, names[3]: 4}
    with torch.no_grad():  # growth is function-preserving: only the pruning changed the output
        torch.testing.assert_close(model(x), expected(x), rtol=1e-12, atol=1e-12)
    assert {r["layer"] for r in records if r["event"] == "grow"} == {names[1], names[3]}


def test_nothing_pruned_when_no_receiver_has_room():
    model = lorambo.configure_model(ResidualNet(hidden=12, blocks=1), 2, capacity=2)
    layers = lorambo.lora_layers(model)
    scores = {n: torch.rand(2, dtype=DT) for n in layers}
    assert alora_round(model, layers, mse, None, n_prune=1, scores=scores) == []
    assert [m.rank for m in layers.values()] == [2, 2]


@pytest.mark.parametrize("scores", [{}, None])
def test_a_round_over_no_layers_changes_nothing(scores):
    """``layers={}`` (given scores, or ablation scores of no layer): no record, the model as it was."""
    model = lorambo.configure_model(ResidualNet(hidden=12, blocks=1), 2, capacity=4)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :2].normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heldout = [(torch.randn(5, 8, dtype=DT), torch.randn(5, 8, dtype=DT))]
    records = [{"event": "earlier"}]
    assert alora_round(model, {}, mse, heldout, n_prune=1, scores=scores, records=records) == [{"event": "earlier"}]
    assert records == [{"event": "earlier"}]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [m.rank for m in lorambo.lora_layers(model).values()] == [2, 2]


def test_config_validation():
    with pytest.raises(ValueError, match="ALoRAConfig.rounds must be an int >= 1"):
        ALoRAConfig(rounds=0)
    model = lorambo.configure_model(ResidualNet(hidden=12, blocks=1), 2)
    heldout = [(torch.randn(5, 12, dtype=DT), torch.randn(5, 12, dtype=DT))]
    # refused when training is set up, not at the first round, which may come hours in
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, missing in (({}, "heldout_batches and loss_fn not given"),
                            ({"loss_fn": mse}, "heldout_batches not given"),
                            ({"heldout_batches": heldout}, "loss_fn not given")):
        opt = LoRAMBoOptimizer(model, 200, allocation="alora", **kwargs)
        opt.compute_optimal_ranks()  # the starting ranks need no scores (`lorambo allocate` prints them)
        with pytest.raises(ValueError, match=f"LoRAMBoOptimizer.configure: allocation='alora' .*; {missing}"):
            opt.configure()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # ALoRA itself refuses them too, for callers that build the schedule directly
    with pytest.raises(ValueError, match="ALoRA needs loss_fn and heldout_batches"):
        ALoRA(model, lorambo.lora_layers(model), mse, None, ALoRAConfig())


@pytest.mark.parametrize("kwargs, message", [
    ({"n_prune": -1}, "n_prune=-1 must be an int >= 1"), ({"n_prune": 2.5}, "n_prune=2.5 must be an int >= 1"),
    ({"n_prune": True}, "n_prune=True must be an int >= 1"),
    ({"n_prune": 1, "budget": math.nan}, "budget=nan must be a number of parameters >= 0"),
    ({"n_prune": 1, "budget": "1000"}, "budget='1000' must be a number"),
    ({"n_prune": 1, "budget": -5}, "budget=-5 must be a number"),
])
def test_bad_round_settings_are_refused_before_any_change(kwargs, message):
    # a NaN budget made every move "not fit": the round returned [] and changed nothing, silently
    model = lorambo.configure_model(ResidualNet(hidden=12, blocks=1), 2, capacity=4)
    layers = lorambo.lora_layers(model)
    before = {n: (m.rank, m.lora_A.detach().clone()) for n, m in layers.items()}
    scores = {n: torch.tensor([0.1, 1.0], dtype=DT) for n in layers}
    with pytest.raises(ValueError, match=rf"ALoRA: {message}"):
        alora_round(model, layers, mse, None, scores=scores, **kwargs)
    assert all(m.rank == before[n][0] and torch.equal(m.lora_A, before[n][1]) for n, m in layers.items())
    kwargs.setdefault("budget", 1000)
    if "budget" in message:  # the schedule refuses it when built, not at its first round
        with pytest.raises(ValueError, match=rf"ALoRA: {message}"):
            ALoRA(model, layers, mse, [None], ALoRAConfig(k1=0, k2=1, rounds=1, n_prune=1), budget=kwargs["budget"])
