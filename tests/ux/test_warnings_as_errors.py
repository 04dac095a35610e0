"""A warning turned into an error (filterwarnings("error"), pytest -W error) comes after the edit
it belongs to has been applied whole, never half-way through it."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import lorambo


def _two_adams():
    """A layer at rank 3 whose pools two stepped Adams hold, each with non-zero moments."""
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), 3, capacity=4)
    pools = [p for p in model.parameters() if p.requires_grad]
    first, second = torch.optim.Adam(pools, lr=1e-2), torch.optim.Adam(pools, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
        model[0].lora_B.grad[:, :3].add_(torch.randn(8, 3, generator=g))  # B starts at 0: its moments too
        first.step()
        second.step()
        for p in pools:
            p.grad = None
    return model, first, second


def test_set_rank_zeroes_the_given_optimizers_dropped_state_before_the_warning_raises():
    """set_rank warned about the other Adam before editing the given one's state: as an error,
    it left the dropped slot's moments in place, and Adam moved that zero slot off zero."""
    model, first, second = _two_adams()
    layer = model[0]
    A_before = first.state[layer.lora_A]["exp_avg"].clone()
    assert A_before[2].abs().sum() > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=lorambo.StaleOptimizerStateWarning)
        with pytest.raises(lorambo.StaleOptimizerStateWarning, match="rank changed 3 -> 2"):
            layer.set_rank(2, optimizer=first)  # the second Adam left behind
    assert layer.rank == 2
    for p, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        for key in ("exp_avg", "exp_avg_sq"):
            state = first.state[p][key]
            assert torch.equal(state.narrow(dim, 2, 2), torch.zeros_like(state.narrow(dim, 2, 2))), (key, dim)
    assert torch.equal(first.state[layer.lora_A]["exp_avg"][:2], A_before[:2])


def test_keep_components_moves_the_given_optimizers_state_before_the_warning_raises():
    """keep_components warned before moving the given optimizer's state: as an error, the pools
    were reordered and the moments were not, so each component trained with another's."""
    model, first, second = _two_adams()
    layer = model[0]
    A = layer.lora_A.detach().clone().double()
    m_A = first.state[layer.lora_A]["exp_avg"].clone().double()
    v_B = first.state[layer.lora_B]["exp_avg_sq"].clone().double()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=lorambo.StaleOptimizerStateWarning)
        with pytest.raises(lorambo.StaleOptimizerStateWarning, match=r"slots \[2, 0\] of 3 kept"):
            layer.keep_components([2, 0], optimizer=first)
    order = [2, 0]
    assert torch.equal(layer.lora_A.detach().double()[:2], A[order])
    assert torch.equal(first.state[layer.lora_A]["exp_avg"].double()[:2], m_A[order])
    assert torch.equal(first.state[layer.lora_B]["exp_avg_sq"].double()[:, :2], v_B[:, order])
    assert not first.state[layer.lora_A]["exp_avg"][2:].any()


def test_keep_components_many_edits_every_layer_before_the_warning_raises():
    """keep_components_many warned at its first layer: as an error, the later layers kept their ranks."""
    model, first, second = _two_adams()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=lorambo.StaleOptimizerStateWarning)
        with pytest.raises(lorambo.StaleOptimizerStateWarning):
            lorambo.nn.keep_components_many([(model[0], [1]), (model[2], [0, 2])], optimizer=first)
    assert (model[0].rank, model[2].rank) == (1, 2)


def test_the_warnings_still_come_once_the_edit_is_done():
    model, first, second = _two_adams()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model[0].set_rank(2, optimizer=first)
    assert [w.category for w in record] == [lorambo.StaleOptimizerStateWarning]
    assert record[0].filename == __file__


def test_a_decision_grows_and_logs_every_layer_before_the_warning_raises(tmp_path, monkeypatch):
    """Torch Adam's shared-step warning, raised as an error at the first grown layer, stopped the
    decision there: the other layers not grown, nothing logged, the capture gone."""
    from lorambo.allocation.report import read_decisions
    from lorambo.nn import optimizer_state

    model, first, _ = _two_adams()
    monkeypatch.setattr(optimizer_state, "_WARNED_SHARED_STEP", WeakIdKeyDictionary())
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, interval=1, log_path=tmp_path / "log.jsonl")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=g)
    with opt.capture(0):
        (model(x) - torch.randn(16, 4, generator=g)).pow(2).mean().backward()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*keeps one step count per parameter")
        warnings.filterwarnings("ignore", category=lorambo.StaleOptimizerStateWarning)  # the second Adam
        with pytest.raises(UserWarning, match="keeps one step count per parameter"):
            opt.step(0, optimizer=first)
    grown = [r["layer"] for r in opt.decisions if r["event"] == "grow"]
    assert sorted(grown) == ["0", "2"] and (model[0].rank, model[2].rank) == (4, 4)
    assert read_decisions(tmp_path / "log.jsonl") == opt.decisions


def test_a_call_that_fails_still_gives_its_warnings_and_its_own_error():
    from lorambo.user_warnings import warn_user, warns_when_done

    @warns_when_done
    def fails():
        warn_user("held until the call ends", RuntimeWarning)
        raise ValueError("the call's own error")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the call's own error"):
            fails()
    assert [str(w.message) for w in record] == ["held until the call ends"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="the call's own error"):  # not masked by the warning
            fails()
