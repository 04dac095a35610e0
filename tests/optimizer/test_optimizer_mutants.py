"""LoRAMBoOptimizer's measuring and planning, checked against independent computations
(found by mutation testing of lorambo/optimizer.py)."""

import warnings

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, head_batches, mse

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measuring_a_model_whose_loss_reaches_every_target_warns_nothing_and_keeps_them_all():
    torch.manual_seed(0)
    model = ResidualNet(head=("lm_head", 3))
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="gradient")
    names = list(opt.names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "no gradient reaches layer(s) []" would be noise
        got = opt.compute_sensitivities(head_batches(), mse)
    assert opt.names == names and list(got) == names
    want = lorambo.sensitivity.gradient_sensitivity(model, mse, head_batches(), modules=names)
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("method", ["hessian", "gradient", "data"])
@pytest.mark.parametrize("missing", ["batches", "loss_fn"])
def test_allocating_from_a_measurement_without_batches_or_loss_fn_names_what_is_missing(method, missing):
    torch.manual_seed(1)
    model = ResidualNet()
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method=method)
    given = {"batches": head_batches(), "loss_fn": mse}
    given[missing] = None
    with pytest.raises(ValueError, match=rf"allocation='closed_form' with sensitivity_method='{method}' "
                                         "needs batches and loss_fn"):
        opt.compute_optimal_ranks(**given)
    assert opt.sensitivities is None and opt.ranks is None and opt.capacities is None


def test_configure_without_ranks_is_refused_before_the_model_changes():
    torch.manual_seed(2)
    model = ResidualNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="frobenius")
    for ranks in (None, {}):
        with pytest.raises(RuntimeError, match=r"configure\(\): call compute_optimal_ranks first or pass ranks"):
            opt.configure(ranks)
    assert not lorambo.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("given, missing", [({}, "heldout_batches and loss_fn"),
                                            ({"heldout_batches": "batches"}, "loss_fn"),
                                            ({"loss_fn": mse}, "heldout_batches")])
def test_alora_configure_without_scoring_inputs_names_them_before_the_model_changes(given, missing):
    torch.manual_seed(3)
    model = ResidualNet()
    given = {k: head_batches(1) if v == "batches" else v for k, v in given.items()}
    opt = LoRAMBoOptimizer(model, 500, allocation="alora", **given)
    ranks = opt.compute_optimal_ranks()  # uniform: nothing measured, so nothing missing yet
    assert sum(r * opt.costs[n] for n, r in ranks.items()) <= 500 and set(ranks) == set(opt.names)
    with pytest.raises(ValueError, match=rf"allocation='alora' scores components.*; {missing} not given"):
        opt.configure()
    assert not lorambo.lora_layers(model)


def test_make_optimizer_defaults_to_lr_1e_3_over_the_trainable_parameters_only():
    torch.manual_seed(4)
    model = ResidualNet()
    opt = LoRAMBoOptimizer(model, 500, sensitivity_method="frobenius")
    opt.compute_optimal_ranks()
    opt.configure()
    torch_opt = opt.make_optimizer()
    assert isinstance(torch_opt, lorambo.optim.AdamW) and opt.default_optimizer is torch_opt
    assert [g["lr"] for g in torch_opt.param_groups] == [1e-3]
    held = {id(p) for g in torch_opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad} and held
    assert not any(id(p) in held for p in model.parameters() if not p.requires_grad)
