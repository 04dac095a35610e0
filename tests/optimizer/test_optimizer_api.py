"""The seed API: sensitivities -> ranks within the budget -> pools with room -> configured model."""

import contextlib

import pytest
import torch
from torch import nn

import lorambo
import lorambo.sensitivity.ablation
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    """Two residual blocks (the default targets) and an lm_head (left out by default)."""
    return ResidualNet(head=("lm_head", 3))


def _batches(n=2):
    return [(torch.randn(12, 8, dtype=DT), torch.randn(12, 3, dtype=DT)) for _ in range(n)]


def _spend(opt, ranks):
    return sum(opt.costs[n] * r for n, r in ranks.items())


@pytest.mark.filterwarnings("ignore:negative Hessian trace")
@pytest.mark.parametrize("method,allocation", [
    ("hessian", "closed_form"), ("gradient", "closed_form"), ("data", "closed_form"),
    ("frobenius", "closed_form"), ("frobenius", "frobenius_greedy"), ("data", "data_weighted"),
    ("gradient", "uniform"), ("gradient", "alora")])
def test_plain_model_ranks_capacities_and_memory(method, allocation):
    model = _net()
    budget = int(torch.randint(200, 700, ()))
    scoring = dict(loss_fn=mse, heldout_batches=_batches(1)) if allocation == "alora" else {}
    opt = LoRAMBoOptimizer(model, budget, sensitivity_method=method, allocation=allocation, num_probes=4, **scoring)
    assert opt.names == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]  # head excluded
    ranks = opt.compute_optimal_ranks(_batches(), mse)
    assert set(ranks) == set(opt.names) and _spend(opt, ranks) <= budget
    for n, r in ranks.items():
        cap = opt.capacities[n]
        assert r <= cap <= min(opt.dims[n]) and cap * opt.costs[n] <= max(budget, r * opt.costs[n])
        assert cap >= min(2 * r, min(opt.dims[n]), budget // opt.costs[n])  # room to grow
    mem = opt.memory_report
    assert mem["total_bytes"] == sum(opt.capacities[n] * opt.costs[n] * 8 for n in opt.names)
    opt.configure()
    layers = lorambo.lora_layers(model)
    assert {n: m.rank for n, m in layers.items()} == ranks
    assert {n: m.capacity for n, m in layers.items()} == opt.capacities


def test_sensitivities_follow_the_estimators():
    model = _net()
    batches = _batches()
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="gradient")
    got = opt.compute_sensitivities(batches, mse)
    want = lorambo.sensitivity.gradient_sensitivity(model, mse, batches, modules=opt.names)
    assert got == pytest.approx(want, rel=1e-12)
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="data")
    got = opt.compute_sensitivities(batches, mse)
    x = batches[0][0]  # E||W x||^2 over the inputs of blocks.0.up, by hand
    w = model.blocks[0]["up"].weight.detach()
    xs = torch.cat([b[0] for b in batches])
    assert got["blocks.0.up"] == pytest.approx(float((xs @ w.T).pow(2).sum(1).mean()), rel=1e-10)
    assert x.shape[1] == 8


def test_closed_form_gives_more_rank_to_more_sensitive_layers():
    model = _net()
    opt = LoRAMBoOptimizer(model, 2000, sensitivity_method="gradient")
    sens = {n: float(v) for n, v in zip(opt.names, torch.rand(4) + 0.01)}
    top = max(opt.names, key=lambda n: sens[n] / opt.costs[n])
    sens[top] *= 50
    ranks = opt.compute_optimal_ranks(sensitivities=sens)
    assert ranks[top] == max(ranks.values())


def test_configured_model_keeps_its_capacities_and_ablation_sensitivity():
    model = lorambo.configure_model(_net(), 2, capacity=4)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :2].normal_()
    xs = [torch.randn(12, 8, dtype=DT) for _ in range(2)]
    with torch.no_grad():  # targets the adapted model fits: removing a component hurts
        batches = [(x, model(x)) for x in xs]
    opt = LoRAMBoOptimizer(model, 400, sensitivity_method="ablation")
    sens = opt.compute_sensitivities(batches, mse)
    scores = lorambo.sensitivity.ablation.ablation_scores(model, mse, batches)
    assert sens == pytest.approx({n: float(a.score.clamp_min(0).sum()) for n, a in scores.items()})
    assert any(v > 0 for v in sens.values())
    ranks = opt.compute_optimal_ranks(sensitivities=sens)
    assert all(r <= 4 for r in ranks.values()) and _spend(opt, ranks) <= 400
    assert opt.capacities == {n: 4 for n in opt.names}
    opt.configure()
    assert {n: m.rank for n, m in lorambo.lora_layers(model).items()} == ranks


def test_allocating_again_after_configure_keeps_the_built_capacities():
    """configure() builds the pools; a second compute_optimal_ranks on the same allocator (new
    sensitivities, mid-training) planned fresh capacities past them (23 for a pool of 16 here), so
    its capacities and memory report were wrong and configure() raised 'already a LoRAMBoLinear
    with capacity=16'. It must plan as an allocator built on the configured model does."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32, dtype=DT) for _ in range(3)))
    opt = LoRAMBoOptimizer(model, 1500, sensitivity_method="frobenius", allocation="uniform")
    opt.compute_optimal_ranks()
    opt.configure()
    built = {n: m.capacity for n, m in lorambo.lora_layers(model).items()}
    assert built == {"0": 16, "1": 16, "2": 16}
    sens = {"0": 9.0, "1": 1.0, "2": 1.0}
    expected = LoRAMBoOptimizer(model, 1500).compute_optimal_ranks(sensitivities=sens)
    opt.allocation = "closed_form"
    ranks = opt.compute_optimal_ranks(sensitivities=sens)
    assert ranks == expected and ranks != {n: m.rank for n, m in lorambo.lora_layers(model).items()}
    assert opt.capacities == built
    assert opt.memory_report["per_layer_bytes"] == {n: c * sum(opt.dims[n]) * 8 for n, c in built.items()}
    opt.configure()
    assert {n: (m.rank, m.capacity) for n, m in lorambo.lora_layers(model).items()} == \
        {n: (ranks[n], built[n]) for n in built}


def test_verbose_prints_memory_before_configuring(capsys):
    opt = LoRAMBoOptimizer(_net(), 500, sensitivity_method="frobenius", verbose=True)
    opt.compute_optimal_ranks()
    out = capsys.readouterr().out
    assert "MiB of device memory" in out
    assert not lorambo.lora_layers(opt.model)  # reported before any pool exists


def test_initial_budget_leaves_room_for_online_growth():
    model = _net()
    opt = LoRAMBoOptimizer(model, 1200, initial_budget=300, sensitivity_method="gradient",
                           interval=1, sketch_rank=3)
    ranks = opt.compute_optimal_ranks(_batches(), mse)
    assert _spend(opt, ranks) <= 300
    opt.configure()
    grown = []
    for step, batch in enumerate(_batches(3)):
        with opt.capture(step):
            mse(model, batch).backward()
        grown += opt.step(step)
    spent = _spend(opt, opt.current_ranks())
    assert grown and 300 < spent <= 1200
    assert all(r["spent"] <= 1200 for r in grown)


def test_decision_step_without_capture_warns():
    model = lorambo.configure_model(_net(), 1, capacity=4)
    opt = LoRAMBoOptimizer(model, 1000, interval=2)
    assert [s for s in range(7) if opt.is_decision_step(s)] == [0, 2, 4, 6]
    with pytest.warns(RuntimeWarning, match="no activations were captured"):
        assert opt.step(2) == []
    assert opt.step(3) == []


def test_decision_step_with_a_forward_but_no_backward_says_the_backward_is_missing():
    # before: "no activations were captured", although the forward had recorded every layer's input
    model = lorambo.configure_model(_net(), 1, capacity=4)
    opt = LoRAMBoOptimizer(model, 1000, interval=2)
    x, y = _batches(1)[0]
    with opt.capture(2):
        mse(model, (x, y))  # the loss, never backward()
    with pytest.warns(RuntimeWarning, match=r"^step 2 is a rank decision step but no gradient reached the layers "
                                            r"\(their forward ran, but no backward\): call loss.backward\(\) inside "
                                            r"opt.capture\(2\), after the forward; its decision is skipped"):
        assert opt.step(2) == []
    with opt.capture(4):
        mse(model, (x, y))
    with pytest.raises(RuntimeError, match=r"^update_ranks: no gradient reached the layers \(their forward ran, "
                                           r"but no backward\): call loss.backward\(\) inside opt.capture\(4\)"):
        opt.update_ranks(step=4)
    assert [m.rank for m in lorambo.lora_layers(model).values()] == [1, 1, 1, 1]


def test_make_optimizer_is_lorambo_adamw_and_the_default_for_rank_changes():
    net = nn.Sequential(nn.Linear(6, 10, dtype=torch.float64), nn.Tanh(), nn.Linear(10, 3, dtype=torch.float64))
    lorambo.configure_model(net, 1, capacity={"0": 4, "2": 3})
    opt = LoRAMBoOptimizer(net, 3 * 16 + 2 * 13, interval=1, sketch_rank=2)
    torch_opt = opt.make_optimizer(lr=0.05)
    assert isinstance(torch_opt, lorambo.optim.AdamW) and opt.default_optimizer is torch_opt
    for step in range(3):  # ranks may change only at the last step
        with opt.capture(step) if step == 2 else contextlib.nullcontext():
            net(torch.randn(8, 6, dtype=torch.float64)).square().mean().backward()
        if step == 2:
            assert opt.step(step)  # grows, editing the default optimizer's state
        torch_opt.step()
        torch_opt.zero_grad()
    grown = [layer for layer in lorambo.lora_layers(net).values() if layer.rank > 1]
    assert grown
    for layer in grown:  # the grown slots count their own Adam steps
        counts = torch_opt.state[layer.lora_A]["slot_step"][:layer.rank].tolist()
        assert counts == [3.0] + [1.0] * (layer.rank - 1)


@pytest.mark.parametrize("sensitivity, allocation", [("frobenius", "frobenius_greedy"), ("data", "data_weighted"),
                                                     ("data", "frobenius_greedy")])
def test_curve_methods_report_the_sensitivities_they_used(sensitivity, allocation):
    """When the curves carry W (and G), the allocation runs on unit sensitivities; opt.sensitivities
    (what ``lorambo allocate`` writes to ranks.json) still held the measured ||W||^2 or E||W x||^2,
    which did not produce these ranks, and "data" ran its covariance pass twice."""
    torch.manual_seed(0)
    model, batches = _net(), _batches(3)
    calls = []

    def counted(m, b):
        calls.append(1)
        return mse(m, b)

    budget = 150
    opt = LoRAMBoOptimizer(model, total_budget=budget, sensitivity_method=sensitivity, allocation=allocation)
    ranks = opt.compute_optimal_ranks(batches, counted)
    assert opt.sensitivities == dict.fromkeys(opt.names, 1.0)
    assert len(calls) == (len(batches) if allocation == "data_weighted" else 0)
    # independent float64 reference: the curves from the weights (and the inputs) by hand, then
    # the allocation from what opt reports
    weights = {n: model.get_submodule(n).weight.detach() for n in opt.names}
    if allocation == "frobenius_greedy":
        curves = {"spectra": {n: torch.linalg.svdvals(w).numpy() for n, w in weights.items()}}
    else:
        inputs = {n: [] for n in opt.names}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
            for n in opt.names]
        with torch.no_grad():
            for b in batches:
                mse(model, b)
        for h in hooks:
            h.remove()
        tails = {}
        for n, w in weights.items():
            x = torch.cat(inputs[n])
            lam, vec = torch.linalg.eigh(x.T @ x / x.shape[0])
            sq = torch.linalg.svdvals(w @ vec @ torch.diag(lam.clamp_min(0).sqrt())).pow(2)
            tails[n] = torch.tensor([float(sq[r:].sum()) for r in range(min(w.shape) + 1)]).numpy()
        curves = {"tail_energies": tails}
    assert ranks == lorambo.allocate(opt.dims, opt.sensitivities, budget, method=allocation, **curves)
    assert sum(r * sum(opt.dims[n]) for n, r in ranks.items()) <= budget and len(set(ranks.values())) > 1


def test_configure_with_ranks_for_some_layers_gives_them_the_planned_capacities():
    """configure(ranks) may name fewer layers than compute_optimal_ranks planned pools for; the
    other planned capacities are no targets of that call and must not reach configure_model,
    which refuses a capacity for a module it does not adapt."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32, dtype=DT) for _ in range(3)))
    opt = LoRAMBoOptimizer(model, 1500, sensitivity_method="frobenius", allocation="uniform")
    opt.compute_optimal_ranks()
    planned = dict(opt.capacities)
    opt.configure({"1": 3})
    assert {n: (m.rank, m.capacity) for n, m in lorambo.lora_layers(model).items()} == {"1": (3, planned["1"])}
