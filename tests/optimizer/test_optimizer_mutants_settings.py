"""LoRAMBoOptimizer's constructor: its documented defaults and the checks it makes before
anything is measured (found by mutation testing of lorambo/optimizer.py)."""

import inspect
import logging
import warnings

import pytest
import torch

import lorambo
from lorambo.allocation.online import OnlineGrowth
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, head_batches, mse

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_measurement_is_hutchinson_with_32_probes_seeded_by_0():
    """docs/allocation.md: by default it measures with sensitivity_method="hessian" (num_probes=32)."""
    torch.manual_seed(0)
    model = ResidualNet(head=("lm_head", 3))
    opt = LoRAMBoOptimizer(model, 500)
    got = opt.compute_sensitivities(head_batches(), mse)
    est = lorambo.sensitivity.hessian_trace(model, mse, head_batches(), modules=opt.names, num_probes=32, seed=0)
    assert {n: e.num_probes for n, e in est.items()} == dict.fromkeys(opt.names, 32)
    assert got == pytest.approx({n: max(e.value, 0.0) for n, e in est.items()}, rel=1e-12)


def test_the_online_settings_default_to_those_of_online_growth():
    """The allocator's growth is an OnlineGrowth built from its settings: left out, they are
    OnlineGrowth's own defaults (one new rank per sketch direction, 4 power iterations, one move)."""
    opt = LoRAMBoOptimizer(ResidualNet(), 500)
    defaults = {k: p.default for k, p in inspect.signature(OnlineGrowth).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert (opt.sketch_rank, opt.power_iters, opt.max_moves, opt.move_threshold, opt.threshold,
            opt.max_tokens, opt.min_rank, opt.max_rank, opt.seed) == \
        tuple(defaults[k] for k in ("sketch_rank", "power_iters", "max_moves", "move_threshold", "threshold",
                                    "max_tokens", "min_rank", "max_rank", "seed"))


def test_the_pool_memory_report_is_logged_but_printed_only_when_verbose(capsys, caplog):
    opt = LoRAMBoOptimizer(ResidualNet(), 500, sensitivity_method="frobenius")
    with caplog.at_level(logging.INFO, logger="lorambo"):
        opt.compute_optimal_ranks()
    assert capsys.readouterr().out == ""
    assert any("MiB of device memory" in r.getMessage() for r in caplog.records)


def test_an_unknown_allocation_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match=r"allocation='greedy'; choose one of \('uniform', 'closed_form'"):
        LoRAMBoOptimizer(ResidualNet(), 500, allocation="greedy")


@pytest.mark.parametrize("setting,match", [
    ({"max_tokens": 0}, "max_tokens=0"),
    ({"max_moves": 0, "move_threshold": 0.1}, "max_moves=0"),
    ({"token_mask": "attention_mask"}, r"LoRAMBoOptimizer: token_mask must be 'auto'.*got 'attention_mask'")])
def test_settings_used_only_at_decision_steps_are_refused_by_the_constructor(setting, match):
    """The first online decision may come hours into training: a bad setting fails at once."""
    with pytest.raises(ValueError, match=match):
        LoRAMBoOptimizer(ResidualNet(), 500, interval=10, **setting)


def test_only_the_main_process_writes_the_decision_log(tmp_path, monkeypatch):
    """Every process takes the same decisions; one file gets them, from process 0."""
    import lorambo.optimizer

    monkeypatch.setattr(lorambo.optimizer, "is_main_process", lambda: False)
    path = tmp_path / "decisions.jsonl"
    torch.manual_seed(0)
    model = ResidualNet(head=("lm_head", 3))
    opt = LoRAMBoOptimizer(model, 800, initial_budget=300, sensitivity_method="frobenius", interval=1,
                           log_path=path)
    opt.compute_optimal_ranks()
    opt.configure()
    with opt.capture(0):
        mse(model, head_batches(1)[0]).backward()
    assert opt.step(0) and opt.decisions  # it decided, and keeps the records in memory
    assert not path.exists()


def test_the_seed_seeds_the_hutchinson_probes():
    torch.manual_seed(0)
    model = ResidualNet(head=("lm_head", 3))
    opt = LoRAMBoOptimizer(model, 500, num_probes=4, seed=7)
    got = opt.compute_sensitivities(head_batches(), mse)
    for seed in (7, 0):
        est = lorambo.sensitivity.hessian_trace(model, mse, head_batches(), modules=opt.names, num_probes=4, seed=seed)
        want = {n: max(e.value, 0.0) for n, e in est.items()}
        assert (got == pytest.approx(want, rel=1e-12)) == (seed == 7)


def test_only_negative_hessian_traces_are_named_in_the_warning_and_set_to_zero(monkeypatch):
    """Tr H of a non-convex loss, or probe noise, can be negative: no rank is owed there. A small
    positive trace is a measurement like any other."""
    from lorambo.sensitivity import Estimate

    opt = LoRAMBoOptimizer(ResidualNet(head=("lm_head", 3)), 500, num_probes=4)
    values = dict(zip(opt.names, [0.5, -0.25, 3.0, 0.0]))
    monkeypatch.setattr(lorambo.sensitivity, "hessian_trace",
                        lambda *args, **kwargs: {n: Estimate(v, 0.1, 4) for n, v in values.items()})
    with pytest.warns(RuntimeWarning, match="negative Hessian trace") as caught:
        got = opt.compute_sensitivities(head_batches(), mse)
    assert [str(w.message) for w in caught] == [f"negative Hessian trace estimates set to 0: {{'{opt.names[1]}': -0.25}}"]
    assert got == {**values, opt.names[1]: 0.0}
    values = dict(zip(opt.names, [0.5, 0.0, 3.0, 1e-9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.compute_sensitivities(head_batches(), mse) == values


@pytest.mark.filterwarnings("ignore:negative Hessian trace")  # 4 probes: an estimate may fall below 0
def test_compute_sensitivities_passes_progress_to_the_hutchinson_estimator(capsys):
    torch.manual_seed(0)
    opt = LoRAMBoOptimizer(ResidualNet(head=("lm_head", 3)), 500, num_probes=4)
    quiet = opt.compute_sensitivities(head_batches(), mse, progress=False)
    assert capsys.readouterr().err == ""
    shown = opt.compute_sensitivities(head_batches(), mse, progress=True)
    assert "hessian_trace" in capsys.readouterr().err
    assert shown == quiet
