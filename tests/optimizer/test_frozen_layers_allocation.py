"""LoRAMBoOptimizer.compute_optimal_ranks on a model whose adapters exist leaves a layer whose
lora_B is frozen at its rank (a new slot there could never train, and a dropped component could
not be relearnt) and shares the budget left among the others. Reference: lorambo.allocate over
the other layers with the frozen layer's parameters taken off the budget."""

import warnings

import numpy as np
import pytest
import torch

import lorambo

from residual_net import ResidualNet

SENS = {"blocks.0.up": 5.0, "blocks.0.down": 1.0, "blocks.1.up": 3.0, "blocks.1.down": 2.0}
FROZEN = "blocks.0.up"  # the most sensitive layer: the allocation would grow it most


def _model():
    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=8)
    lorambo.lora_layers(model)[FROZEN].lora_B.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["closed_form", "knapsack"])
def test_a_frozen_layer_keeps_its_rank_and_the_others_share_the_rest(method):
    model = _model()
    budget = 20 * 16
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=budget, sensitivity_method="frobenius", allocation=method)
    # the knapsack reads its gain curves, not sensitivities (compute_optimal_ranks refuses those there)
    kwargs = {"benefits": {n: s * 0.7 ** np.arange(8) for n, s in SENS.items()}} if method == "knapsack" \
        else {"sensitivities": SENS}
    ranks = opt.compute_optimal_ranks(**kwargs)
    others = [n for n in SENS if n != FROZEN]
    want = lorambo.allocate({n: opt.dims[n] for n in others}, {n: SENS[n] for n in others}, budget - 2 * 20,
                            method=method, capacities={n: 8 for n in others},
                            **{k: {n: v[n] for n in others} for k, v in kwargs.items() if k == "benefits"})
    assert ranks == {**want, FROZEN: 2}  # before: the frozen layer got rank 4 and more of the budget
    assert sum(ranks.values()) > 8  # the others grew into the budget the frozen layer left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # configure() grows no frozen layer, so it does not warn
        opt.configure()
    assert opt.current_ranks() == ranks


def test_frozen_layers_holding_more_than_the_budget_is_refused_naming_them():
    opt = lorambo.LoRAMBoOptimizer(_model(), total_budget=30, sensitivity_method="frobenius", allocation="uniform")
    with pytest.raises(ValueError, match=r"frozen \['blocks.0.up'\] keep their ranks, which take 40 parameters, "
                                         r"more than initial_budget=30"):
        opt.compute_optimal_ranks()


def test_frozen_layers_leaving_too_little_for_min_rank_is_refused_naming_them_and_the_budget():
    # before: allocate's "budget=50 is below the cost of min_rank=1 in every layer", a budget
    # nobody passed (initial_budget less the frozen layer's 40)
    opt = lorambo.LoRAMBoOptimizer(_model(), total_budget=90, sensitivity_method="frobenius", allocation="uniform",
                                   min_rank=1)
    with pytest.raises(ValueError, match=r"frozen \['blocks.0.up'\] keep their ranks, which take 40 parameters, and "
                                         r"min_rank=1 in the other layers takes 60: 100 in all, more than "
                                         r"initial_budget=90"):
        opt.compute_optimal_ranks()
    assert opt.ranks is None or opt.ranks == {}
