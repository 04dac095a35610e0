"""lorambo's warning categories are reachable from ``lorambo`` for filters."""

import warnings

import torch
from torch import nn

import lorambo


def _layer_left_behind_by_adam():
    torch.manual_seed(0)
    model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), 1, capacity=4)
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(5, 6)).pow(2).mean().backward()
    adam.step()
    return model[0], adam  # the Adam alive: lorambo tracks it weakly


def test_categories_are_exported_and_filter_their_warning():
    """They were only at lorambo.nn / lorambo.model.frozen_heads: lorambo.X was an AttributeError."""
    assert {"StaleOptimizerStateWarning", "FrozenHeadWarning"} <= set(lorambo.__all__)
    assert lorambo.FrozenHeadWarning is lorambo.model.frozen_heads.FrozenHeadWarning
    with warnings.catch_warnings(record=True) as unfiltered:
        warnings.simplefilter("always")
        layer, adam = _layer_left_behind_by_adam()
        layer.set_rank(2)  # without the Adam that holds its state
    assert [w.category for w in unfiltered] == [lorambo.nn.StaleOptimizerStateWarning]
    with warnings.catch_warnings(record=True) as filtered:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=lorambo.StaleOptimizerStateWarning)
        layer, adam = _layer_left_behind_by_adam()
        layer.set_rank(2)
    assert filtered == []
